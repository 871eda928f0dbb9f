"""Latency: the table's prediction is the sum of its parts, it round-trips and refuses another architecture, and
both runtimes time real models; the command line builds a table from an architecture file alone."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ofa
from conftest import SEED_SPACE, TINY_UNITS, tiny_net, without_onnxruntime
from ofa.deploy import latency
from ofa.deploy import parts as subnet_parts
from ofa.model.subnet import MBBlock, block_shapes

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 16, 16)


def fake_ms(model, input_shape, runtime, batch_size, threads, device) -> float:
    """A runtime whose costs are known: 0.5 ms for any run, plus each part's own."""
    if isinstance(model, subnet_parts._Overhead):
        return 0.5
    if isinstance(model, MBBlock):  # grows with the kernel, the expanded channels and the input's area
        return 0.5 + model.depthwise.kernel_size[0] / 8 + model.depthwise.out_channels / 64 + input_shape[1] / 4
    if isinstance(model, subnet_parts._Head):
        return 0.5 + 3.0
    return 0.5 + 2.0  # the stem


def part_inputs(sub, shape) -> list[tuple[int, ...]]:
    """The input shape of each of the subnet's parts (``subnet_parts._parts``)."""
    h, shapes = torch.zeros(1, *shape), []
    with torch.no_grad():
        for part in subnet_parts._parts(sub.eval()):
            shapes.append(tuple(h.shape[1:]))
            h = part(h)
    return shapes


def fake_subnets(subnets, input_shape, parts, runtime, batch_size, threads, device, progress=None, chains=None,
                 whole=None) -> tuple[float, list[float], list[float]]:
    """``_time_subnets`` on the fake runtime: a whole subnet costs the overhead plus its parts' own (or
    `whole(subnet)`)."""
    def own(sub) -> list[float]:
        return [fake_ms(p, s, runtime, batch_size, threads, device) - 0.5
                for p, s in zip(subnet_parts._parts(sub), part_inputs(sub, input_shape))]

    wholes = [whole(sub) if whole else 0.5 + sum(own(sub)) for sub in subnets]
    return 0.5, wholes, [0.5 + own(subnets[i])[j] for i, j in parts]


@pytest.fixture
def fake_table(monkeypatch):
    monkeypatch.setattr(latency, "_time_subnets", fake_subnets)
    return latency.LatencyTable.build(tiny_net(SEED_SPACE), SHAPE, calibrate=0, progress=False)


def test_a_fake_runtime_with_known_costs_gives_exact_predictions(fake_table):
    net = tiny_net(SEED_SPACE)
    rng = random.Random(0)
    for cfg in [*net.uniform_configs(), *(net.sample_config(rng) for _ in range(20))]:
        expected = 0.5 + 2.0 + 3.0
        for u, blocks in enumerate(block_shapes(net.arch, cfg)):
            for b, block in enumerate(blocks):
                size = 8 if u == 1 and b > 0 else 16  # the tiny net: 16x16 until unit 1's first block (stride 2)
                expected += block.kernel / 8 + block.mid_channels / 64 + size / 4
        assert fake_table.predict(cfg) == pytest.approx(expected, abs=1e-9), str(cfg)
    # every distinct variant once, 2 kernels x 2 widths each: unit 0's blocks all take 8 channels at 16x16 (one
    # variant per choice), unit 1's first block and its others differ (input, stride)
    assert len(fake_table.blocks) == 12 and fake_table.overhead_ms == 0.5


def test_the_covering_configs_hold_every_part_the_table_times():
    """The uniform configs at the largest depth, one per kernel and width, hold every block variant of the space:
    the table's parts are cut out of them. The tiny net, and the shipped CIFAR-10 one (5 units, 32x32)."""
    from conftest import committed_params
    from ofa.pipeline.checkpoint import build_net
    from ofa.pipeline.config import parse_params

    cifar = build_net(parse_params(committed_params()), (3, 32, 32), [str(k) for k in range(10)])
    for net, shape in ((tiny_net(SEED_SPACE), SHAPE), (cifar, (3, 32, 32))):
        covering = latency.covering_configs(net.arch)
        assert len(covering) == len(net.space.kernel) * len(net.space.width)
        assert all(c.uniform_values()[1] == max(net.space.depth) for c in covering)
        held = {key for cfg in covering for key in latency._block_keys(net.arch, shape, cfg)}
        assert held == set(latency._variants(net.arch, shape))


def test_parts_cut_out_of_one_export_are_the_graphs_of_the_parts_exported_alone(monkeypatch):
    """onnxruntime: a subnet exported once with its parts' outputs as graph outputs; the whole and each part cut
    out of it have the operators of the whole and of that part exported alone, and time in the right order."""
    import onnx

    from ofa.deploy import timing

    exported = []
    monkeypatch.setattr(subnet_parts, "_export_all", lambda jobs, progress: exported.extend(
        timing._export_all(jobs, progress)) or exported)
    net = tiny_net(SEED_SPACE)
    sub = net.extract(net.max_config()).eval()
    pieces = subnet_parts._parts(sub)
    picked = [1, len(pieces) - 1]  # the first block, the head
    overhead, wholes, part_ms = latency._time_subnets([sub], SHAPE, [(0, j) for j in picked], "onnxruntime", 1, 1,
                                                      "cpu")
    assert 0 < overhead < min(part_ms) and max(part_ms) < wholes[0] < 1000
    whole, cut = subnet_parts._cut(exported[1], len(pieces), picked)  # exported[0]: the overhead's model
    ops = lambda graph: [n.op_type for n in onnx.load_model_from_string(graph).graph.node]  # noqa: E731
    assert ops(whole) == ops(timing._onnx_bytes(sub, torch.randn(1, *SHAPE)))
    inputs = part_inputs(sub, SHAPE)
    for j, graph in zip(picked, cut):
        assert ops(graph) == ops(timing._onnx_bytes(pieces[j].eval(), torch.randn(1, *inputs[j]))), j


def test_a_subnet_chained_from_parts_of_other_exports_is_its_own_export_and_computes_its_parts(monkeypatch):
    """onnxruntime: a per-block config of the least depth, not exported: its graph is the chain of parts cut out of
    two other subnets' exports, with the operators and attributes of its own export, in order, and the output of
    those parts run one after another in PyTorch."""
    import numpy as np
    import onnx
    import onnxruntime

    from ofa.deploy import timing
    from ofa.model import Subnet, SubnetConfig

    exported, timed = [], []
    monkeypatch.setattr(subnet_parts, "_export_all", lambda jobs, progress: exported.extend(
        timing._export_all(jobs, progress)) or exported)
    monkeypatch.setattr(subnet_parts, "_time_onnx", lambda graphs, threads, progress: timed.extend(graphs) or
                        [1.0] * len(graphs))
    net = tiny_net(SEED_SPACE)
    torch.manual_seed(0)
    a, b = (Subnet.build(net.arch, c).eval() for c in (net.space.uniform(2, 5, 3, 2), net.space.uniform(2, 7, 3, 4)))
    mixed = SubnetConfig(kernel=[[5, 7, 0], [7, 5, 0]], depth=[2, 2], width=[[2, 4, 0], [4, 2, 0]])
    # stem, unit 0's blocks 0 and 1, unit 1's blocks 0 and 1 (parts 4 and 5 of a depth-3 subnet), head
    chain = [(0, 0), (0, 1), (1, 2), (1, 4), (0, 5), (0, 7)]
    parts = sorted({*chain, (1, 0)})
    c = Subnet.build(net.arch, mixed).eval()
    latency._time_subnets([a, b, c], SHAPE, parts, "onnxruntime", 1, 1, "cpu", chains={2: chain})
    assert len(exported) == 3  # the overhead's model, a and b: not c
    chained = timed[3][0]  # the overhead, then a, b and c whole

    def nodes(graph: bytes) -> list[tuple]:
        return [(n.op_type, sorted((at.name, str(onnx.helper.get_attribute_value(at))) for at in n.attribute
                                   if at.type != onnx.AttributeProto.TENSOR))
                for n in onnx.load_model_from_string(graph).graph.node]

    assert nodes(chained) == nodes(timing._onnx_bytes(c, torch.randn(1, *SHAPE)))
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        h = x
        for i, j in chain:
            h = subnet_parts._parts((a, b)[i])[j](h)
    session = onnxruntime.InferenceSession(chained, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, h.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="^chains: "):
        latency._time_subnets([a, b, c], SHAPE, parts, "onnxruntime", 1, 1, "cpu", chains={2: [(1, 3)]})


def test_a_table_is_scaled_to_whole_subnets_measured_beside_it(fake_table, monkeypatch):
    """Whole subnets that cost 10% more than their parts (beyond the fixed cost): the table's scale is 1.1, fitted
    on random per-block configs, and every prediction follows."""
    def whole_costs_more(*args, **kwargs):
        return fake_subnets(*args, **kwargs, whole=lambda sub: 0.5 + 1.1 * (fake_table.predict(sub.config) - 0.5))

    monkeypatch.setattr(latency, "_time_subnets", whole_costs_more)
    net = tiny_net(SEED_SPACE)
    checks = net.uniform_configs()[:3]
    table, measured = latency.LatencyTable.build_and_measure(net, SHAPE, checks, calibrate=2, progress=False)
    assert table.scale == pytest.approx(1.1, abs=1e-5) and fake_table.scale == 1.0
    assert measured == pytest.approx([0.5 + 1.1 * (fake_table.predict(c) - 0.5) for c in checks])  # in order
    calibrated = [c["config"] for c in table.calibration]
    assert len(set(calibrated)) == 2 and all(c.startswith("kxw-") for c in calibrated)  # per-block, not uniform
    assert calibrated == [str(c) for c in latency.calibration_configs(net.arch, 2)]  # the same on every machine
    for cfg in [*net.uniform_configs(), *(net.sample_config(random.Random(1)) for _ in range(5))]:
        assert table.predict(cfg) == pytest.approx(0.5 + 1.1 * (fake_table.predict(cfg) - 0.5), rel=1e-4)
    checked = latency.validation_configs(net.arch, 40, seed=0, exclude=calibrated)
    assert not set(calibrated) & {str(c) for c in checked}  # a check is out of sample


def test_a_saved_table_round_trips_and_another_architecture_is_refused(fake_table, tmp_path):
    path = tmp_path / "table.json"
    fake_table.save(path)
    net = tiny_net(SEED_SPACE)
    loaded = latency.LatencyTable.load(path, net.arch, SHAPE)
    assert loaded == fake_table
    saved = json.loads(path.read_text())
    assert saved["format"] == latency.FORMAT and saved["runtime"] == "onnxruntime"
    assert {"cpu", "cores", "gpu"} <= set(saved["host"]) and saved["threads"] == 1 and saved["batch_size"] == 1
    other = ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=64)
    with pytest.raises(latency.LatencyError, match=r"^\S+table\.json: built for another architecture "
                                                   r"\(final_channels differ\); build it for this one"):
        latency.LatencyTable.load(path, other.arch, SHAPE)
    with pytest.raises(latency.LatencyError, match=r"built for input \[3, 16, 16\], the data has \[3, 32, 32\]"):
        latency.LatencyTable.load(path, net.arch, (3, 32, 32))
    renamed = ofa.OFANet(SEED_SPACE, 3, 10, units=TINY_UNITS, stem_channels=8, final_channels=32,
                         classes=[f"c{k}" for k in range(10)])
    assert latency.LatencyTable.load(path, renamed.arch, SHAPE) == fake_table  # class names cost nothing
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(latency.LatencyError, match=r"bad\.json: not a latency table of this version"):
        latency.LatencyTable.load(tmp_path / "bad.json")


def test_bad_runtimes_and_devices_are_one_line(monkeypatch):
    net = tiny_net(SEED_SPACE)
    with pytest.raises(ValueError, match=r"^runtime 'tensorrt' is not allowed \(onnxruntime or torch\)$"):
        latency.LatencyTable.build(net, SHAPE, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"^runtime onnxruntime runs on the CPU here"):
        ofa.measure_latency(net, SHAPE, device="cuda")
    without_onnxruntime(monkeypatch)
    with pytest.raises(ValueError, match=r"^runtime onnxruntime: the onnxruntime package is not installed"):
        ofa.measure_latency(net, SHAPE)


def test_both_runtimes_time_a_real_subnet():
    net = tiny_net(SEED_SPACE)
    small, large = (net.extract(c).eval() for c in (net.min_config(), net.max_config()))
    for runtime in latency.RUNTIMES:
        ms = [ofa.measure_latency(sub, SHAPE, runtime=runtime, batch_size=8) for sub in (small, large)]
        assert 0 < ms[0] < ms[1] < 1000, (runtime, ms)


def test_the_command_line_builds_a_table_from_an_architecture_file_alone(tmp_path):
    net = tiny_net(SEED_SPACE)
    (tmp_path / "arch.json").write_text(json.dumps({"arch": net.arch, "input_shape": list(SHAPE)}))
    result = subprocess.run([sys.executable, "-m", "ofa.latency", "build", "--arch", "arch.json", "--out",
                             "table.json", "--runtime", "torch", "--threads", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("table.json: 12 block variants, stem, head and overhead in ")
    assert "Warning" not in result.stderr  # python -m runs the command without importing it first
    table = latency.LatencyTable.load(tmp_path / "table.json", net.arch, SHAPE)
    assert table.runtime == "torch" and table.runtime_version == f"torch {torch.__version__}"
    small, large = table.predict(net.min_config()), table.predict(net.max_config())
    assert 0 < small < large
    (tmp_path / "arch.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "ofa.latency", "build", "--arch", "arch.json", "--out",
                             "t2.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and not (tmp_path / "t2.json").exists()
    assert result.stderr == ('error: arch.json: not an architecture file ({"arch": ..., "input_shape": [C, H, W]}, '
                             "as the latency stage writes models/arch.json)\n")


def test_kendall_tau_b_counts_concordant_discordant_and_tied_pairs():
    assert latency.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert latency.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # tau-b with a tie: 5 concordant pairs, 1 tied in the first list only: 5 / sqrt((5 + 1) * 5)
    assert abs(latency.kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) - 5 / 30 ** 0.5) < 1e-12
    assert latency.kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0  # a constant list ranks nothing


def test_the_fastest_subnet_is_the_least_prediction_of_the_whole_space(fake_table):
    """fastest() is exact: no config of the tiny space (every depth, kernel and width of every block) predicts less."""
    import itertools

    net = tiny_net(SEED_SPACE)
    config, ms = fake_table.fastest()
    assert fake_table.predict(config) == pytest.approx(ms, abs=1e-9)
    space = SEED_SPACE
    per_unit = []  # every (depth, kernels, widths) of one unit, inactive slots at the smallest choice
    for depth in space.depth:
        for choice in itertools.product(itertools.product(space.kernel, space.width), repeat=depth):
            pad = [(space.kernel[0], space.width[0])] * (space.max_depth - depth)
            per_unit.append((depth, [k for k, _ in choice] + [k for k, _ in pad], [w for _, w in choice] + [w for _, w in pad]))
    least = min(fake_table.predict(ofa.SubnetConfig(kernel=[u[1] for u in units], depth=[u[0] for u in units],
                                                    width=[u[2] for u in units]))
                for units in itertools.product(per_unit, repeat=net.num_units))
    assert ms == pytest.approx(least, abs=1e-9)


def test_validation_checks_every_uniform_config_and_random_ones_against_the_table(fake_table):
    """validate() measures each config whole: with a measurement 10% above the table, every figure follows."""
    net = tiny_net(SEED_SPACE)
    configs = latency.validation_configs(net.arch, 5, seed=0)
    assert configs[:8] == net.uniform_configs() and len(set(configs)) == 13
    assert latency.validation_configs(net.arch, 5, seed=0) == configs  # seeded
    figures, records = latency.validate(fake_table, configs, lambda cfgs: [fake_table.predict(c) * 1.1 for c in cfgs])
    assert figures["configs"] == 13 and figures["kendall_tau"] == 1.0 and figures["within_10pct"] == 1.0
    assert figures["mape_pct"] == pytest.approx(100 * 0.1 / 1.1, abs=0.01)
    assert [r["config"] for r in records] == [str(c) for c in configs]
    assert all(r["macs"] == net.macs(c, SHAPE) for r, c in zip(records, configs))
