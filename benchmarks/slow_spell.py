"""A command run on a machine made uniformly slower: its whole process tree frozen for --stop-ms in every
--run-ms + --stop-ms (a cgroup freezer), as a slow spell of a shared machine slows every process.

    sudo python benchmarks/slow_spell.py -- make quick               # frozen 30 ms in every 100: 1/0.7 slower
    sudo python benchmarks/slow_spell.py --run-ms 80 --stop-ms 20 -- make test

A process hogging one core slows a two-threaded training step but leaves single-threaded work (exports, DVC,
onnxruntime on one thread) at full speed, and so does a CPU quota; freezing the tree slows both alike. Needs root
and a cgroup freezer (v1: /sys/fs/cgroup/freezer; v2: cgroup.freeze). Prints the command's wall time and exits
with its status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/freezer")
V2 = Path("/sys/fs/cgroup")


def freezer(name: str) -> tuple[Path, Path, str, str]:
    """A new freezer cgroup: (its directory, the file that freezes it, frozen value, thawed value)."""
    if V1.is_dir():
        group = V1 / name
        group.mkdir(exist_ok=True)
        return group, group / "freezer.state", "FROZEN", "THAWED"
    if (V2 / "cgroup.controllers").is_file():
        group = V2 / name
        group.mkdir(exist_ok=True)
        return group, group / "cgroup.freeze", "1", "0"
    raise OSError("no cgroup freezer (neither /sys/fs/cgroup/freezer nor cgroup v2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-ms", type=float, default=70.0, help="milliseconds the tree runs in each cycle")
    parser.add_argument("--stop-ms", type=float, default=30.0, help="milliseconds it is frozen in each cycle")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: python benchmarks/slow_spell.py -- COMMAND ...")
    if args.run_ms <= 0 or args.stop_ms < 0:
        parser.error("--run-ms must be > 0 and --stop-ms >= 0")
    try:
        group, state, frozen, thawed = freezer(f"slow-spell-{os.getpid()}")
    except OSError as e:
        print(f"error: {e} (run as root on Linux)", file=sys.stderr)
        return 2
    done = threading.Event()

    def toggle() -> None:
        while not done.wait(args.run_ms / 1000):
            state.write_text(frozen)
            time.sleep(args.stop_ms / 1000)
            state.write_text(thawed)

    start = time.perf_counter()
    try:
        child = subprocess.Popen(command, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    except OSError as e:  # no such command: leave no cgroup behind
        group.rmdir()
        print(f"error: {command[0]}: {e.strerror}", file=sys.stderr)
        return 127
    toggler = threading.Thread(target=toggle, daemon=True)
    toggler.start()
    try:
        status = child.wait()
    finally:
        done.set()
        toggler.join()
        state.write_text(thawed)
        seconds = time.perf_counter() - start
        try:
            group.rmdir()
        except OSError:
            pass  # processes the command left behind still in it
    share = args.run_ms / (args.run_ms + args.stop_ms)
    minutes, rest = divmod(round(seconds), 60)
    print(f"slow_spell: {' '.join(command)}: {seconds:.1f} s wall ({minutes} min {rest:02d} s), "
          f"running {share:.0%} of the time (every process {1 / share:.2f}x slower); exit status {status}",
          file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
