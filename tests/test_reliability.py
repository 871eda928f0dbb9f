"""Reliability: resume after a kill, determinism, divergence guard, safe and checked loading, atomic writes."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from ofa.pipeline import checkpoint, context, download, evaluate_space, process, training
from ofa.pipeline.config import parse_params
from ofa.io import write_json
from test_pipeline import ROOT, STAGES, tiny_params

DIGITS = [str(i) for i in range(10)]  # the synthetic dataset's classes


def stage(name: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    return result


def stages_in_one_process(names: list[str], cwd: Path) -> str:
    """Run stage scripts one after another in one Python process (one torch import, not one per stage); output."""
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        if e.code:\n"
            "            raise\n")
    result = subprocess.run([sys.executable, "-c", code, *(str(ROOT / "stages" / f"{n}.py") for n in names)],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{names}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def outputs(root: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote except wall-clock timings; the picks without their measured latencies."""
    files = [p for d in ("models", "metrics", "data/prepared") for p in (root / d).rglob("*") if p.is_file()]
    found = {str(p.relative_to(root)): p.read_bytes() for p in files if "timing" not in p.parts}
    picks = json.loads(found["metrics/picks.json"])
    for pick in picks["budgets"].values():
        assert pick.pop("measured_onnx_ms") > 0 and pick.pop("measured_torch_ms") > 0
    found["metrics/picks.json"] = json.dumps(picks).encode()
    for name in ("metrics/baseline_alone.json", "metrics/baseline.json"):  # training seconds, and what they project
        found[name] = json.dumps(_timeless(json.loads(found[name]))).encode()
    return found


def _timeless(obj):
    """A JSON value without its wall-clock figures: seconds (keys ending in _s), images/s and time ratios."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items()
                if not (k.endswith("_s") or k in ("images_per_s", "alone_over_supernet"))}
    return [_timeless(v) for v in obj] if isinstance(obj, list) else obj


# The latency stage's outputs: measurements, which no two runs repeat; the second run takes the first one's, so
# that what depends on them (the picks' predicted latency) compares.
LATENCY_OUTPUTS = ("models/arch.json", "models/latency_table.json", "metrics/latency.json",
                   "metrics/latency_validation.json", "metrics/latency.png")


def kill_after_first_epoch(cwd: Path, name: str) -> int:
    """Start a stage, SIGKILL it once its resume state holds at least one finished epoch; the epochs done."""
    state = cwd / ".resume" / f"{name}.pt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, f"{name} ended before writing its resume state"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(torch.load(state, weights_only=True)["history"])


def kill_when(cwd: Path, name: str, pattern: str) -> str:
    """Start a stage and SIGKILL it as soon as a line of its output matches `pattern`; its output until then."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"{name} ended without printing {pattern!r}")
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    return "".join(lines)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "data" not in p.parts and ".resume" not in p.parts)


def profile() -> dict:
    """The synthetic profile, with dropout: it draws from torch's global generator, which a resume must restore."""
    raw = tiny_params()
    raw["supernet"]["epochs"] = 4
    raw["net"]["dropout"] = 0.1
    raw["specialize"]["budgets"] = [1500000]
    return raw


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The synthetic profile run twice. The first runs every stage in one process; in the second,
    train_supernet is killed after an epoch (and rerun with other params of later stages, which its progress
    does not depend on), baseline after an epoch of its first config and again after that config, evaluate_space
    after its first config and specialize mid-search, each then rerun in a new process."""
    assert STAGES == ["download", "latency", "train_supernet", "shrink_kernel", "shrink_depth", "shrink_width",
                      "baseline", "evaluate_space", "compare", "specialize"]
    raw = profile()
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    for root in (a, b):
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
    stages_in_one_process(STAGES, a)
    log = {}
    stage("download", b)
    for name in LATENCY_OUTPUTS:
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        (b / name).write_bytes((a / name).read_bytes())
    log["epochs_before_kill"] = kill_after_first_epoch(b, "train_supernet")
    log["after_kill/train_supernet"] = _files(b)
    other = profile()  # rerun after a change of a later stage's params: the progress is train_supernet's still
    other["shrink"]["width"]["lr"], other["evaluate"]["sampled_configs"] = 0.5, 3
    (b / "params.yaml").write_text(yaml.safe_dump(other))
    log["resumed/train_supernet"] = stages_in_one_process(["train_supernet"], b)
    (b / "params.yaml").write_text(yaml.safe_dump(raw))
    stages_in_one_process(["shrink_kernel", "shrink_depth", "shrink_width"], b)
    log["baseline_epochs_before_kill"] = kill_after_first_epoch(b, "baseline")
    log["after_kill/baseline"] = _files(b)
    log["resumed_epoch/baseline"] = kill_when(b, "baseline", r"^\[1/2\] ")  # killed again after its first config
    for s, printed in (("baseline", None), ("evaluate_space", r"^\[1/\d+\] "), ("compare", None),
                       ("specialize", r"^search 5/")):
        if printed:
            kill_when(b, s, printed)
            log[f"after_kill/{s}"] = _files(b)
        result = stage(s, b)
        log[f"resumed/{s}"] = result.stdout + result.stderr
    return [(a, {}), (b, log)]


def test_killed_stage_leaves_no_output_and_resumes(two_runs):
    (_, _), (b, log) = two_runs
    assert 1 <= log["epochs_before_kill"] < 4
    # no checkpoint, metrics or curves of the killed stage (the latency stage's files are the first run's)
    assert log["after_kill/train_supernet"] == sorted(["params.yaml", *LATENCY_OUTPUTS])
    resumed = f"train_supernet: resuming after epoch {log['epochs_before_kill']}/4"
    assert resumed in log["resumed/train_supernet"]
    assert not (b / ".resume" / "train_supernet.pt").exists()  # removed once the outputs are written


def test_killed_evaluate_space_and_specialize_resume_where_they_stopped(two_runs):
    (_, _), (b, log) = two_runs
    assert "metrics/space.json" not in log["after_kill/evaluate_space"]
    assert "evaluate_space: resuming after config 1/9" in log["resumed/evaluate_space"]
    assert "[1/9]" not in log["resumed/evaluate_space"]  # the finished config is not evaluated again
    assert not any("specialize" in f or "search" in f for f in log["after_kill/specialize"])
    assert re.search(r"search: resuming after [5-9]/14 trials", log["resumed/specialize"])
    # each training stage's state removed once its outputs exist; the search kept for other budgets or trials
    assert [p.name for p in (b / ".resume").rglob("*") if p.is_file()] == ["specialize.db"]


def test_killed_baseline_resumes_within_a_config_and_after_it(two_runs):
    """Killed after an epoch of its first config, the rerun goes on from that epoch; killed again once that config
    is done, the next run trains the second alone (test_same_params_give_byte_identical_outputs: the same bytes)."""
    (_, _), (b, log) = two_runs
    epochs = log["baseline_epochs_before_kill"]
    assert 1 <= epochs < 7  # of the schedule's 4 + 1 + 1 + 1
    assert not any("baseline" in f for f in log["after_kill/baseline"])
    assert f"baseline k5-d2-w2: resuming after epoch {epochs}/7" in log["resumed_epoch/baseline"]
    assert "baseline: resuming after config 1/2" in log["resumed/baseline"]
    assert "[1/2]" not in log["resumed/baseline"] and "[2/2] k7-d3-w4 (max)" in log["resumed/baseline"]
    assert not any((b / ".resume").glob("baseline*"))


def test_a_baseline_starts_from_the_seeds_fresh_init_not_from_a_checkpoint(two_runs, tmp_path, monkeypatch):
    """Each config's training starts from the weights train_supernet starts from (the seed's init), whatever
    checkpoints lie in models/; with baseline.kd the full network of train_supernet.pt is the teacher, named by
    its md5, and compare refuses the result once that file changes."""
    import shutil

    from ofa.io import md5_file
    from ofa.pipeline import baseline, compare
    from ofa.pipeline.checkpoint import CheckpointError
    from ofa.pipeline.config import ParamsError

    (a, _), _ = two_runs
    root = tmp_path / "root"
    for d in ("data/prepared", "models", "metrics"):
        shutil.copytree(a / d, root / d)
    raw = profile()
    raw["baseline"].update(kd=True, epochs=1)
    params = parse_params(raw)
    started = []
    fit = baseline.fit
    monkeypatch.setattr(baseline, "fit", lambda model, *args, **kw: started.append(
        ({k: v.clone() for k, v in model.state_dict().items()}, kw["teacher"], kw["kd_ratio"])) or fit(model, *args, **kw))
    result = baseline.baseline(params, root, progress=False)
    torch.manual_seed(params.seed)
    fresh = checkpoint.build_net(params, (3, 16, 16), DIGITS)
    trained = checkpoint.build_net(params, (3, 16, 16), DIGITS)
    checkpoint.load_checkpoint(trained, root / "models" / "train_supernet.pt")
    assert [r["name"] for r in result["records"]] == ["min", "max"] and len(started) == 2
    for (state, teacher, kd_ratio), cfg in zip(started, (fresh.min_config(), fresh.max_config())):
        init, other = fresh.extract(cfg).state_dict(), trained.extract(cfg).state_dict()
        assert state.keys() == init.keys() and all(torch.equal(state[k], init[k]) for k in init)
        assert not all(torch.equal(state[k], other[k]) for k in other)
        assert teacher is not None and teacher.training and kd_ratio == 1.0  # batch statistics, official OFA
    assert result["kd"] and result["teacher_md5"] == md5_file(root / "models" / "train_supernet.pt")
    assert compare.compare(params, root, progress=False)[0]["kd"]
    shutil.copy(root / "models" / "shrink_kernel.pt", root / "models" / "train_supernet.pt")  # another teacher
    with pytest.raises(CheckpointError, match=r"metrics/baseline_alone.json: distilled from another "
                                              r"models/train_supernet.pt .*dvc repro --force --single-item baseline"):
        compare.compare(params, root, progress=False)
    (root / "models" / "train_supernet.pt").unlink()
    with pytest.raises(ParamsError, match=r"^baseline.kd: true distils from models/train_supernet.pt, which is not"):
        baseline.baseline(params, root, progress=False)


def test_no_baseline_configs_train_nothing_and_compare_reports_no_config(two_runs, tmp_path):
    import shutil

    from ofa.pipeline import baseline, compare

    (a, _), _ = two_runs
    for d in ("data/prepared", "models", "metrics"):
        shutil.copytree(a / d, tmp_path / d)
    raw = profile()
    raw["baseline"]["configs"] = []
    params = parse_params(raw)
    assert baseline.baseline(params, tmp_path, progress=False)["records"] == []
    assert list((tmp_path / "models" / "baseline").iterdir()) == []
    result, headline = compare.compare(params, tmp_path, progress=False)
    assert result["configs"] == [] and headline == {} and result["totals"]["alone"]["projected_s"] is None
    assert json.loads((tmp_path / "metrics" / "baseline_plot.json").read_text()) == []
    assert compare.totals_line(result).endswith("no config trained alone (baseline.configs: [])")


def test_an_unreadable_search_store_is_removed_and_the_search_starts_afresh(two_runs, tmp_path, capsys):
    """.resume/specialize.db holding something else (a file written over, a truncated copy) is only a lost
    shortcut: specialize says so in one line, removes it and searches anew, to the picks of a first run."""
    import shutil

    from ofa.pipeline import specialize

    (a, _), _ = two_runs
    for d in ("data/prepared", "models", "metrics"):
        shutil.copytree(a / d, tmp_path / d)
    store = tmp_path / ".resume" / "specialize.db"
    store.parent.mkdir()
    store.write_text("not a database\n")
    specialize.specialize(parse_params(profile()), tmp_path, progress=False)
    err = capsys.readouterr().err
    assert "specialize: .resume/specialize.db was unreadable (file is not a database); removed, the search starts " \
           "afresh" in err
    def picks(root: Path) -> dict:  # the measured milliseconds of the exports aside
        found = json.loads((root / "metrics" / "picks.json").read_text())["budgets"]
        return {b: {k: v for k, v in p.items() if not k.startswith("measured_")} for b, p in found.items()}

    assert picks(tmp_path) == picks(a) and picks(a)
    with sqlite3.connect(store) as db:  # the new store holds this search's scores
        assert db.execute("SELECT COUNT(*) FROM ofa_scores").fetchone()[0] > 0


def test_a_baseline_config_not_of_the_space_is_one_line_before_any_work(two_runs, tmp_path):
    import shutil

    (a, _), _ = two_runs
    shutil.copytree(a / "data" / "prepared", tmp_path / "data" / "prepared")
    raw = profile()
    raw["baseline"]["configs"] = ["min", "k7-d3-w3"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = stage("baseline", tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: baseline.configs[1]: 'k7-d3-w3' is not a config of the space: k<kernel>-d<depth>-w<width> or "
        "kxw-<kernel>x<width>.<...>|<...> (2 units; kernels [5, 7], depths [2, 3], widths ['2', '4']); or min, max"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # nothing started


def test_evaluate_space_resumes_a_config_in_the_middle_of_its_fine_tuning(two_runs, tmp_path, monkeypatch):
    """Stopped after the first of config 2's two fine-tuning epochs, the rerun continues that fine-tuning
    at its second epoch and writes the space.json of an uninterrupted run."""
    import shutil

    from ofa.train import state as train_state

    (a, _), _ = two_runs
    raw = profile()
    raw["evaluate"].update(sampled_configs=0)
    raw["evaluate"]["finetune"]["epochs"] = 2
    params = parse_params(raw)
    roots = {}
    for name in ("whole", "stopped"):
        roots[name] = tmp_path / name
        for d in ("data/prepared", "models"):
            shutil.copytree(a / d, roots[name] / d)
    saves = []
    save = train_state.save
    monkeypatch.setattr(train_state, "save", lambda *args: saves.append(args[0]) or save(*args))
    evaluate_space.evaluate_space(params, roots["whole"], progress=False)
    assert len(saves) == 8 * 2  # a state per fine-tuning epoch

    def stop_after_three(*args):
        save(*args)
        saves.append(args[0])
        if len(saves) == 3:  # config 1 fine-tuned, config 2 one epoch into its fine-tuning
            raise KeyboardInterrupt

    saves.clear()
    monkeypatch.setattr(train_state, "save", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        evaluate_space.evaluate_space(params, roots["stopped"], progress=False)
    saves.clear()
    monkeypatch.setattr(train_state, "save", lambda *args: saves.append(args[0]) or save(*args))
    evaluate_space.evaluate_space(params, roots["stopped"], progress=False)
    assert len(saves) == 8 * 2 - 3  # config 2's first epoch was not trained again
    space = [(roots[name] / "metrics" / "space.json").read_bytes() for name in ("whole", "stopped")]
    assert space[0] == space[1]


def test_same_params_give_byte_identical_outputs(two_runs):
    (a, _), (b, _) = two_runs
    out_a, out_b = outputs(a), outputs(b)
    assert len(out_a) > 20 and out_a.keys() == out_b.keys()
    assert "models/train_supernet.pt" in out_a and "metrics/space.json" in out_a
    differing = [k for k in out_a if out_a[k] != out_b[k]]
    assert differing == []


def test_non_finite_loss_stops_the_stage_with_one_line(two_runs, tmp_path):
    (a, _), _ = two_runs
    raw = tiny_params()
    raw["supernet"]["lr"] = 1.0e12
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    stage("download", tmp_path)
    result = stage("train_supernet", tmp_path, check=False)
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]  # above it: the progress bar
    assert re.fullmatch(r"error: train_supernet: loss is (nan|inf) at epoch 1 step \d+ \(lr [0-9.e+]+\); "
                        r"lower the learning rate", last), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics" / "train_supernet.json").exists()


def test_ctrl_c_stops_a_stage_with_one_line(tmp_path):
    raw = tiny_params()
    raw["supernet"]["epochs"] = 50  # still training when the signal comes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    download.download(parse_params(raw), tmp_path)
    # as from a terminal: Ctrl-C's signal handled (a shell starting the tests in the background ignores it,
    # and its children would inherit that)
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / "train_supernet.py")], cwd=tmp_path, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (tmp_path / ".resume" / "train_supernet.pt").exists():  # an epoch finished
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.splitlines()[-1] == "error: stopped by SIGINT; rerun the stage to resume where it stopped", err
    assert "Traceback" not in err and not (tmp_path / "models").exists()
    assert (tmp_path / ".resume" / "train_supernet.pt").exists()  # what the next run resumes from


def train_supernet_in_this_process(root: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """What stages/train_supernet.py runs, in this process, in root; its exit status."""
    import gc

    monkeypatch.chdir(root)
    try:
        with pytest.raises(SystemExit) as info:
            process.main(lambda params: training.train_stage(params, "train_supernet", progress=False))
    finally:
        gc.unfreeze()  # main freezes the objects before it exits
    return info.value.code


def test_a_failed_write_is_one_line(tmp_path, monkeypatch, capsys):
    raw = tiny_params()
    raw["supernet"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    download.download(parse_params(raw), tmp_path)
    (tmp_path / "models").write_text("a file where the models folder goes")
    assert train_supernet_in_this_process(tmp_path, monkeypatch) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("error: FileExistsError: [Errno 17] File exists: "
                                                        "'models'")


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    raw = tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    download.download(parse_params(raw), tmp_path)
    raw["net"]["final_channels"] = 10**13  # a 640 TB final layer: beyond any machine's address space
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert train_supernet_in_this_process(tmp_path, monkeypatch) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"error: out of memory \(DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                        r"640000000000000 bytes\. Error code 12 \(Cannot allocate memory\)\); lower train\.batch_size or "
                        r"train\.eval_batch_size, or the network \(net\.units, net\.final_channels, space\.width\)",
                        last), last


def test_checkpoint_of_other_params_is_refused(two_runs):
    (a, _), _ = two_runs
    ckpt = a / "models" / "shrink_width.pt"
    raw = profile()
    shape = (3, 16, 16)
    checkpoint.load_checkpoint(checkpoint.build_net(parse_params(raw), shape, DIGITS), ckpt)  # the matching one loads
    raw["space"]["kernel"] = [3, 5, 7]
    raw["specialize"]["population"] = None  # 12 uniform configs now
    with pytest.raises(checkpoint.CheckpointError, match=r"built with space = .*'kernel': \[5, 7\]"):
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(raw), shape, DIGITS), ckpt)
    raw = profile()
    raw["net"]["units"][1]["channels"] = 24
    with pytest.raises(checkpoint.CheckpointError, match=r"built with net.units = "):
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(raw), shape, DIGITS), ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=r"built for in_channels = 3, the prepared data has 1 \(data.dataset;"):
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(profile()), (1, 16, 16), DIGITS), ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=r"trained on classes .*\(10 in all\), the prepared data has "
                       r"classes '0', '1', '2', '3', \.\.\. \(9 in all\) \(data.dataset;"):  # the names, not a count
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(profile()), shape, DIGITS[:9]), ckpt)
    other = [*DIGITS[:9], "ten"]  # as many classes, one of them another
    with pytest.raises(checkpoint.CheckpointError, match=r"^\S+shrink_width.pt: trained on classes '0', '1', '2', '3', "
                       r"\.\.\. \(10 in all\), the prepared data has classes '0', .*\(data.dataset; rerun"):
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(profile()), shape, other), ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=r"built with net.dropout = 0.1, params give 0.0"):
        checkpoint.load_checkpoint(checkpoint.build_net(parse_params(tiny_params()), shape, DIGITS), ckpt)


def test_a_resume_state_belongs_to_the_params_dvc_yaml_gives_its_stage():
    """The resume key's params are the ones dvc reruns the stage for: no more (a change elsewhere would throw a
    stopped stage's progress away), no fewer (a resumed stage would mix two settings)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, names in context.STAGE_PARAMS.items():
        assert tuple(stages[stage]["params"]) == names, stage
    params = parse_params(tiny_params())
    assert context.stage_params(params, "shrink_depth")["shrink.depth"] == {
        "epochs": 1, "lr": 0.05, **{k: v for k, v in asdict(params.shrink.depth).items() if k not in ("epochs", "lr")}}


def test_a_resume_state_belongs_to_its_params_inputs_and_process_count(tmp_path, monkeypatch):
    """A stage started by torchrun with another process count (train.processes unchanged) starts afresh."""
    from ofa.train import distributed

    inputs = [tmp_path / "a.pt"]
    inputs[0].write_bytes(b"one")
    params = parse_params(tiny_params())
    key = context.resume_key(params, "shrink_width", inputs)
    assert context.resume_key(params, "shrink_width", inputs) == key
    assert context.resume_key(params, "shrink_depth", inputs) != key
    raw = tiny_params()
    raw["shrink"]["width"]["lr"] = 0.5  # its own params
    assert context.resume_key(parse_params(raw), "shrink_width", inputs) != key
    raw = tiny_params(val_images=100)  # the data's params, whose effect is in the inputs' content, and the
    raw["specialize"]["budgets"] = [900000]  # params of stages after it: its progress is kept
    raw["shrink"]["kernel"]["lr"] = 0.5
    assert context.resume_key(parse_params(raw), "shrink_width", inputs) == key
    inputs[0].write_bytes(b"two")
    assert context.resume_key(params, "shrink_width", inputs) != key
    inputs[0].write_bytes(b"one")
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    assert context.resume_key(params, "shrink_width", inputs) != key


def test_garbage_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    net = checkpoint.build_net(parse_params(tiny_params()), (3, 16, 16), DIGITS)
    with pytest.raises(checkpoint.CheckpointError, match=r"x.pt: unreadable checkpoint"):
        checkpoint.load_checkpoint(net, bad)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing.pt: checkpoint not found \(run the upstream stage first"):
        checkpoint.load_checkpoint(net, tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    checkpoint.save_checkpoint(net, good)
    ckpt = torch.load(good, weights_only=True)
    torch.save({"arch": 3, "state_dict": ckpt["state_dict"]}, bad)
    with pytest.raises(checkpoint.CheckpointError, match=r"x.pt: not a checkpoint of this pipeline"):
        checkpoint.load_checkpoint(net, bad)
    ckpt["state_dict"]["stem.0.weight"] = ckpt["state_dict"]["stem.0.weight"][:, :1]  # damaged: another shape
    torch.save(ckpt, bad)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(net, bad)
    assert re.fullmatch(r"\S+x\.pt: its weights do not fit its architecture \(size mismatch for stem\.0\.weight: .*; "
                        r"rerun the upstream stages: dvc repro\)", str(info.value)), str(info.value)
    del ckpt["state_dict"]["stem.0.weight"]
    torch.save(ckpt, bad)
    with pytest.raises(checkpoint.CheckpointError, match=r"its weights do not fit its architecture \(Missing key"):
        checkpoint.load_checkpoint(net, bad)


def test_every_torch_load_is_weights_only():
    calls = [(p.name, line) for p in (ROOT / "ofa").glob("*.py") for line in p.read_text().splitlines()
             if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})

    with pytest.raises(TypeError):
        write_json(target, {"a": object()})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["m.json"]


def test_written_files_get_a_plain_files_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644  # readable by a deployer, not only the owner


def test_a_failed_download_keeps_the_previous_prepared_set_whole(tmp_path, monkeypatch):
    """Splits from two runs never sit side by side: data/prepared is replaced only once every file is written."""
    from ofa import data as data_mod

    raw = tiny_params()
    download.download(parse_params(raw), tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "prepared").iterdir()}
    assert sorted(before) == ["classes.json", "test.pt", "train.pt", "val.pt"]
    save = data_mod.save_split

    def fail_on_val(split, path):
        if path.name == "val.pt":
            raise OSError(28, "No space left on device")
        save(split, path)

    monkeypatch.setattr(data_mod, "save_split", fail_on_val)
    raw["data"]["val_images"] = 64  # another train split: written before val fails
    with pytest.raises(OSError, match="No space left"):
        download.download(parse_params(raw), tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "prepared").iterdir()} == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["prepared"]  # no staging folder left
    monkeypatch.setattr(data_mod, "save_split", save)
    assert download.download(parse_params(raw), tmp_path)["val_images"] == 64
    assert (tmp_path / "data" / "prepared" / "train.pt").read_bytes() != before["train.pt"]
