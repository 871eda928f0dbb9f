"""Stage latency: the latency table of this architecture on the target device, checked against whole subnets.

It needs the architecture only (space, net, and the prepared data's input shape and classes), no trained
weights: it runs beside the training stages, and no training param reruns it. It writes

- models/arch.json: what ``python -m ofa.latency build --arch`` takes on another machine;
- models/latency_table.json: measured here, or latency.table's file (built on the target), checked against the
  architecture and the latency params;
- metrics/latency.json: the check's headline figures, as DVC shows them (Kendall's tau, mean absolute % error,
  share within 10%);
- metrics/latency_validation.json: those figures with the host, the runtime, the fastest subnet and MACs' own
  tau, then each checked config's predicted and measured milliseconds (`records`), drawn in
  metrics/latency.png. A table from another machine is not checked here: its figures come from there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..deploy import LatencyTable
from ..deploy.latency import CALIBRATE, calibration_configs, validate, validation_configs
from ..deploy.timing import check_runtime
from ..io import write_json
from . import figures
from .config import Params, ParamsError
from .context import METRICS, MODELS, architecture

ARCH = MODELS / "arch.json"
TABLE = MODELS / "latency_table.json"
VALIDATION = METRICS / "latency_validation.json"
FIGURE = METRICS / "latency.png"


def latency(params: Params, root: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    """Build (or take) the table, check it against every uniform config and latency.validate random ones, write
    the stage's outputs; returns metrics/latency_validation.json's figures (all but the records)."""
    lat = params.latency
    start = time.perf_counter()
    check_runtime(lat.runtime, lat.hardware)  # an unknown runtime, its package missing, no GPU: before any work
    arch, shape = architecture(params, root)
    if lat.table is not None:
        table = given_table(params, root, arch, shape)
        checked, records = {}, []
    else:
        configs = validation_configs(arch, lat.validate, seed=params.seed,
                                     exclude=[str(c) for c in calibration_configs(arch, CALIBRATE)])
        # the checked subnets timed whole beside the parts, in the same rounds (one export each)
        table, measured = LatencyTable.build_and_measure(arch, shape, configs, runtime=lat.runtime,
                                                         batch_size=lat.batch_size, threads=lat.threads,
                                                         device=lat.hardware, calibrate=CALIBRATE, progress=progress)
        checked, records = validate(table, configs, lambda _: measured)
        if progress:
            for r in records:
                print(f"{r['config']}: predicted {r['predicted_ms']:.4f} ms, measured {r['measured_ms']:.4f} ms",
                      file=sys.stderr, flush=True)
    fastest_config, fastest = table.fastest()
    slowest = table.predict(params.space.build().max_config(len(arch["units"])))
    h = table.host
    details = {"device": lat.device, "host": f"{h['cpu']}, {h['cores']} cores" + (f", {h['gpu']}" if h["gpu"] else ""),
               "runtime": table.runtime_version, "threads": table.threads, "batch_size": table.batch_size,
               **checked, "scale": table.scale, "fastest_config": str(fastest_config), "fastest_ms": round(fastest, 5),
               "max_config_ms": round(slowest, 5), "build_s": table.build_s}
    # the headline DVC shows: three figures (dvc metrics show stays readable); the rest with the records
    headline = {k: checked[k] for k in ("kendall_tau", "mape_pct", "within_10pct") if k in checked}
    write_json(root / ARCH, {"arch": arch, "input_shape": list(shape)})
    table.save(root / TABLE)
    write_json(root / VALIDATION, {**details, "records": records})
    figures.latency_scatter(records, f"{table.runtime_version}, {table.threads} thread(s), batch {table.batch_size}",
                            root / FIGURE)
    write_json(root / METRICS / "latency.json", headline)
    write_json(root / METRICS / "timing" / "latency.json",
               {"wall_s": round(time.perf_counter() - start, 1), "build_s": table.build_s, "configs_checked":
                len(records)})
    return details


def given_table(params: Params, root: Path, arch: dict[str, Any], shape: tuple[int, ...]) -> LatencyTable:
    """latency.table's file, refused with one line naming it unless it was built for this architecture and input
    with latency.runtime, .threads and .batch_size."""
    lat = params.latency
    table = LatencyTable.load(root / lat.table, arch, shape)
    built = (table.runtime, table.threads, table.batch_size, table.device)
    if built != (lat.runtime, lat.threads, lat.batch_size, lat.hardware):
        raise ParamsError(f"latency.table: {lat.table} was built with runtime {table.runtime}, {table.threads} "
                          f"thread(s), batch {table.batch_size} on {table.device}; set latency.runtime, .threads, "
                          ".batch_size and .hardware to match (the budgets and the picks' timings use them)")
    return table
