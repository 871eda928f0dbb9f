"""Deploying a subnet: save/load without the supernet, ONNX export checked against PyTorch with onnxruntime."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import ofa
from ofa.deploy.export import ExportError
from conftest import SEED_SPACE, TINY_UNITS, perturb, tiny_net

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subnet() -> ofa.Subnet:
    net = perturb(tiny_net(SEED_SPACE, in_channels=3)).eval()
    return net.extract(net.sample_config(random.Random(2)))


def test_save_and_load_rebuild_the_subnet_without_the_supernet(subnet, tmp_path):
    ofa.save_subnet(subnet, tmp_path / "s.pt")
    loaded = ofa.load_subnet(tmp_path / "s.pt")
    assert type(loaded) is ofa.Subnet and not loaded.training
    assert loaded.config == subnet.config and loaded.arch == subnet.arch
    assert not any("Elastic" in type(m).__name__ for m in loaded.modules())
    assert loaded.state_dict().keys() == subnet.state_dict().keys()
    for k, v in subnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(loaded(x), subnet.eval()(x), rtol=0, atol=0)
    assert ofa.count_macs(loaded, (1, 3, 16, 16)) == ofa.count_macs(subnet, (1, 3, 16, 16))


def test_load_refuses_what_is_not_a_saved_subnet(subnet, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ExportError, match=r"junk.pt: unreadable saved subnet"):
        ofa.load_subnet(tmp_path / "junk.pt")
    torch.save({"format": "ofa-subnet/1", "arch": subnet.arch, "config": subnet.config.to_dict(),
                "state_dict": {}}, tmp_path / "empty.pt")
    with pytest.raises(ExportError, match=r"empty.pt: not a consistent saved subnet \(.*Missing key"):
        ofa.load_subnet(tmp_path / "empty.pt")
    with pytest.raises(ExportError, match="expected a Subnet"):
        ofa.save_subnet(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_onnx_takes_raw_pixels_and_equals_pytorch(subnet, tmp_path):
    mean, std = [125.0, 120.0, 110.0], [60.0, 62.0, 64.0]
    pixels = torch.randint(0, 256, (6, 3, 16, 16)).float()
    diff = ofa.export_onnx(subnet, tmp_path / "s.onnx", (3, 16, 16), mean=mean, std=std, check_inputs=pixels)
    assert 0 <= diff <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "pixels" and inp.shape[1:] == [3, 16, 16] and isinstance(inp.shape[0], str)  # dynamic batch
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = subnet.eval()(normalised).numpy()
    for batch in (1, 6):  # any batch size
        got = session.run(None, {"pixels": pixels[:batch].numpy()})[0]
        np.testing.assert_allclose(got, expected[:batch], rtol=0, atol=1e-4)
    model = onnx.load(str(tmp_path / "s.onnx"))
    ops = {n.op_type for n in model.graph.node}  # batch norm in the convs; the subnet itself left as it was
    assert "Conv" in ops and "BatchNormalization" not in ops
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in subnet.modules())
    props = {p.key: p.value for p in model.metadata_props}
    assert ofa.SubnetConfig.from_json(props["ofa.config"]) == subnet.config
    assert props["ofa.input"].startswith("raw pixel values 0..255, RGB, float32 (N, 3, 16, 16); an image of another "
                                         "size: its shorter side resized to 16 (bicubic), then the centre 16x16") and props["ofa.mean"] == "[125.0, 120.0, 110.0]"


@pytest.mark.parametrize("shape, mean, std, message", [
    ((1, 16, 16), None, None, r"input_shape \(1, 16, 16\): expected \(C, H, W\) with C = 3"),
    ((16, 16), None, None, r"input_shape \(16, 16\): expected \(C, H, W\)"),
    ((3, 16, 16), [120.0], None, "give both mean and std, or neither"),
    ((3, 16, 16), [120.0], [60.0], r"mean \[120.0\]: expected 3 finite values, one per input channel$"),
    ((3, 16, 16), [1, 2, 3], [60, 0, 60], r"std \[60.0, 0.0, 60.0\]: expected 3 finite .*, each positive$"),
    ((3, 16, 16), [1, float("nan"), 3], [1, 1, 1], r"mean \[1.0, nan, 3.0\]: expected 3 finite"),
])
def test_onnx_export_refuses_a_shape_or_normalisation_that_does_not_fit(subnet, tmp_path, shape, mean, std, message):
    with pytest.raises(ValueError, match=r"^export_onnx: " + message):
        ofa.export_onnx(subnet, tmp_path / "s.onnx", shape, mean=mean, std=std)
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_normalisation_takes_the_subnets_own_input(subnet, tmp_path):
    x = torch.randn(3, 3, 16, 16)
    # checked on one image (a val split of one): the exported batch dimension is dynamic all the same
    assert ofa.export_onnx(subnet, tmp_path / "n.onnx", (3, 16, 16), check_inputs=x[:1]) <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = subnet.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="both mean and std"):
        ofa.export_onnx(subnet, tmp_path / "m.onnx", (3, 16, 16), mean=[1.0, 1.0, 1.0])
    assert not (tmp_path / "m.onnx").exists()


def test_a_failed_export_leaves_no_partial_models_folder(tmp_path, monkeypatch):
    from ofa import data as data_mod
    from ofa.deploy import search
    from ofa.pipeline import specialize
    from ofa.train import DeviceData

    net = perturb(tiny_net(SEED_SPACE)).eval()
    train, test = data_mod.synthetic(seed=0)
    train, val = data_mod.hold_out(train, 64, seed=0)
    data = DeviceData(train, val, test, torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 64.0),
                      torch.device("cpu"))
    subnets = specialize._Subnets(net, data, data.calibration_batches(64, 64, seed=0), 256)
    shape = (3, 16, 16)
    cands = [search.Candidate(cfg, net.macs(cfg, shape), subnets.val_accuracy(cfg), i)
             for i, cfg in enumerate(net.uniform_configs())]
    calls = []

    def export_twice_then_fail(sub, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise ExportError(f"{path}: onnxruntime output differs")
        path.write_bytes(b"onnx")
        return 0.0

    def serially(export):  # export_onnx_many, one export after the other in this process
        return lambda jobs, *args, **kwargs: [export(sub, path, *args, **kwargs) for sub, path in jobs]

    monkeypatch.setattr(specialize, "export_onnx_many", serially(export_twice_then_fail))
    out = tmp_path / "models" / "specialized"
    with pytest.raises(ExportError, match="differs"):
        specialize.export_picks(cands, [700_000, 900_000], subnets, out, shape, [128.0] * 3, [64.0] * 3,
                                check_inputs=val.images[:4].float(), progress=False)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.rglob("*")) == ["models"]  # no staging, no half folder
    picks = specialize.export_picks(cands, [900_000], subnets, out, shape, [128.0] * 3, [64.0] * 3,
                                    check_inputs=val.images[:4].float(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["macs-0.9M.onnx", "macs-0.9M.pt"]
    best = max((c for c in cands if c.cost <= 900_000), key=lambda c: (c.accuracy, -c.cost))
    assert picks["macs-0.9M"]["config"] == str(best.config) and picks["macs-0.9M"]["macs"] <= 900_000
    assert picks["macs-0.9M"]["accuracy"] == subnets.test[best.config]  # tested once, the exported subnet
    calls.clear()

    def export(sub, path, *args, **kwargs):
        calls.append(path)
        path.write_bytes(str(sub.config).encode())
        return 1e-6

    monkeypatch.setattr(specialize, "export_onnx_many", serially(export))
    picks = specialize.export_picks(cands, [900_000, 2_000_000], subnets, out, shape, [128.0] * 3, [64.0] * 3,
                                    check_inputs=val.images[:4].float(), progress=False)
    assert picks["macs-0.9M"]["config"] == picks["macs-2M"]["config"] == str(best.config)  # no better one below 2M
    assert [p.name for p in calls] == ["macs-0.9M.onnx"]  # the same subnet: exported once, copied
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files["macs-2M.onnx"] == files["macs-0.9M.onnx"] == str(best.config).encode()
    assert files["macs-2M.pt"] == files["macs-0.9M.pt"] and picks["macs-2M"]["onnx_max_abs_diff"] == 1e-6


def test_export_onnx_many_writes_what_export_onnx_writes_in_two_processes(subnet, tmp_path):
    net = perturb(tiny_net(SEED_SPACE, in_channels=3)).eval()
    other = net.extract(net.min_config())
    pixels = torch.randint(0, 256, (4, 3, 16, 16)).float()
    kwargs = dict(mean=[128.0] * 3, std=[64.0] * 3, check_inputs=pixels)
    diffs = ofa.deploy.export_onnx_many([(subnet, tmp_path / "a.onnx"), (other, tmp_path / "b.onnx")], (3, 16, 16),
                                        **kwargs)
    for name, sub, diff in (("a", subnet, diffs[0]), ("b", other, diffs[1])):
        assert 0 <= diff <= 1e-4 and ofa.export_onnx(sub, tmp_path / f"{name}1.onnx", (3, 16, 16), **kwargs) <= 1e-4
        assert (tmp_path / f"{name}.onnx").read_bytes() == (tmp_path / f"{name}1.onnx").read_bytes()
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(IsADirectoryError):  # an error in another process is raised here
        ofa.deploy.export_onnx_many([(subnet, tmp_path / "c.onnx"), (other, tmp_path / "d.onnx")], (3, 16, 16),
                                    **kwargs)


@pytest.mark.parametrize("channels", [3, 1])
def test_the_deploy_doc_runs_an_exported_model_on_one_image(tmp_path, monkeypatch, capsys, channels):
    """docs/deploy.md's onnxruntime snippet, run as written, names the class PyTorch's subnet picks (colour and grey)."""
    from PIL import Image

    (snippet,) = re.findall(r"```python\n(import json\n.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    classes = [f"class-{k}" for k in range(10)]
    net = perturb(ofa.OFANet(SEED_SPACE, channels, 10, units=TINY_UNITS, stem_channels=8, final_channels=32,
                             classes=classes)).eval()
    sub = net.extract(net.sample_config(random.Random(4)))
    mean, std = (125.0, 120.0, 110.0)[:channels], (60.0, 62.0, 64.0)[:channels]
    (tmp_path / "models" / "specialized").mkdir(parents=True)
    ofa.export_onnx(sub, tmp_path / "models" / "specialized" / "macs-40M.onnx", (channels, 16, 16), mean=mean,
                    std=std)
    colour = (200, 40, 90)[:channels]
    Image.new("RGB" if channels == 3 else "L", (40, 24), colour if channels == 3 else colour[0]).save(
        tmp_path / "image.png")  # another size: resized, then cropped
    pixels = torch.tensor(colour, dtype=torch.float32).view(1, channels, 1, 1).expand(1, channels, 16, 16)
    with torch.no_grad():
        logits = sub((pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/deploy.md", "exec"), {})
    assert capsys.readouterr().out == f"{classes[int(logits.argmax())]}\n"


def test_the_library_doc_snippet_runs_as_written(tmp_path, monkeypatch):
    """docs/library.md's tour of the library, run as written: its names exist and its calls fit their signatures."""
    (snippet,) = re.findall(r"```python\n(import ofa, random, torch\n.*?)```", (ROOT / "docs" / "library.md").read_text(),
                            re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "docs/library.md", "exec"), scope)
    sub, cfg, net = scope["sub"], scope["cfg"], scope["net"]
    assert isinstance(sub, ofa.Subnet) and sub.config == cfg
    assert net.macs(cfg, (3, 32, 32)) == ofa.count_macs(sub, (1, 3, 32, 32))
    assert (tmp_path / "sub.pt").is_file() and (tmp_path / "sub.onnx").is_file()


def test_a_channels_last_subnet_exports_the_graph_of_a_contiguous_one(tmp_path):
    """A subnet of a supernet trained channels-last (as the stages train) exports the same graph as a contiguous
    one: traced channels-last, the exporter adds shape operations that make the model run up to 2x slower."""
    import copy

    import onnx

    net = perturb(tiny_net(SEED_SPACE)).eval()
    sub = net.extract(net.max_config())
    ofa.export_onnx(sub, tmp_path / "contiguous.onnx", (3, 16, 16), mean=[128.0] * 3, std=[64.0] * 3)
    ofa.export_onnx(copy.deepcopy(sub).to(memory_format=torch.channels_last), tmp_path / "channels_last.onnx",
                    (3, 16, 16), mean=[128.0] * 3, std=[64.0] * 3)
    ops = {name: sorted(n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node)
           for name in ("contiguous", "channels_last")}
    assert ops["channels_last"] == ops["contiguous"] and "Gather" not in ops["contiguous"]

