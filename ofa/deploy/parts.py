"""A subnet's parts (stem, each block, head) timed alone, each cut out of one export of the whole subnet.

A latency table (``ofa.deploy.latency``) needs every part's own time and a few whole subnets'. Exporting each
part on its own costs an export per part (1-4 s each here); instead a subnet is exported once with every part's
output as a graph output (``_Boundaries``) and each part is cut out of that graph (``_cut``,
``onnx.utils.Extractor``): the same operators as the part exported alone, and the same times. Any other subnet
of the space is then its parts' graphs run one after another (``_chain``, ``onnx.compose``): the operators of its
own export, in order, with the same attributes, and the same times, in milliseconds of work instead of seconds of
export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..model import Subnet
from ..model.subnet import classify
from .timing import _export_all, _time_modules, _time_onnx


class _Head(nn.Module):
    """The final 1x1 layer, pooling, feature mix, dropout and classifier of a subnet: its head."""

    def __init__(self, sub: Subnet) -> None:
        super().__init__()
        self.final, self.mix, self.dropout, self.classifier = sub.final, sub.mix, sub.dropout, sub.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(self.final(x), self.mix, self.dropout, self.classifier)


class _Overhead(nn.Module):
    """As little work as a model can do on the input: what one inference costs beyond its layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1] + 1


def _parts(sub: Subnet) -> list[nn.Module]:
    """A subnet's parts, each taking the previous one's output: the stem, each active block, the head."""
    return [sub.stem, *(block for unit in sub.units for block in unit), _Head(sub)]


class _Boundaries(nn.Module):
    """A subnet that also outputs what each of its parts hands the next: exported once, each part is cut out of
    the graph (``_cut``) as the graph of that part exported alone (the same operators and attributes)."""

    def __init__(self, sub: Subnet) -> None:
        super().__init__()
        self.parts = nn.ModuleList(_parts(sub))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for part in self.parts:
            x = part(x)
            outputs.append(x)
        return tuple(outputs)


def _boundary_names(parts: int) -> list[str]:
    """The graph outputs of a ``_Boundaries`` export: each part's output, the last (the logits) "output"."""
    return [f"part{j}" for j in range(parts - 1)] + ["output"]


def _cut(data: bytes, parts: int, wanted: Sequence[int]) -> tuple[bytes, list[bytes]]:
    """The whole subnet (input -> logits) and each `wanted` part (by index) cut out of a ``_Boundaries`` export."""
    import onnx
    import onnx.utils

    names = ["input", *_boundary_names(parts)]
    extractor = onnx.utils.Extractor(onnx.load_model_from_string(data))
    cut = lambda first, last: extractor.extract_model([first], [last]).SerializeToString()  # noqa: E731
    return cut("input", "output"), [cut(names[j], names[j + 1]) for j in wanted]


def _chain(graphs: Sequence[bytes]) -> bytes:
    """One model that runs `graphs` (parts cut by ``_cut``: one input and one output each) one after another, each
    part's names prefixed with its place so that the parts' names cannot clash."""
    import onnx
    import onnx.compose

    models = [onnx.compose.add_prefix(onnx.load_model_from_string(g), f"p{k}/") for k, g in enumerate(graphs)]
    model = models[0]
    for part in models[1:]:
        model = onnx.compose.merge_models(model, part, io_map=[(model.graph.output[0].name, part.graph.input[0].name)])
    return model.SerializeToString()


def _time_subnets(subnets: Sequence[Subnet], input_shape: tuple[int, ...], parts: Sequence[tuple[int, int]],
                  runtime: str, batch_size: int, threads: int, device: str, progress: str | None = None,
                  chains: Mapping[int, Sequence[tuple[int, int]]] | None = None,
                  ) -> tuple[float, list[float], list[float]]:
    """Milliseconds per batch of one inference's fixed cost (``_Overhead``), of each subnet whole, and of each of
    `parts` alone ((subnet index, part index in ``_parts``)), all timed in the same interleaved rounds.

    On onnxruntime a subnet with parts wanted is exported once with every part's output as a graph output, and its
    parts and its whole are cut out of that graph (``_cut``): an export per subnet, none per part. A subnet in
    `chains` (index -> the parts it is made of, in order, each among `parts`) is not exported: its graph is those
    parts' graphs run one after another (``_chain``). Each part runs on random inputs of the shape it takes in the
    subnet. The torch runtime runs every subnet whole, as it is.
    """
    chains = dict(chains or {})
    split = sorted({i for i, _ in parts})
    if set(chains) & set(split) or not {p for chain in chains.values() for p in chain} <= set(parts):
        raise ValueError("chains: subnets without parts of their own, made of parts among `parts`")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=generator)
    shapes: dict[tuple[int, int], tuple[int, ...]] = {}
    with torch.no_grad():
        for i in split:
            h = x
            for j, part in enumerate(_parts(subnets[i].eval())):
                shapes[i, j] = tuple(h.shape[1:])
                h = part(h)
    if runtime == "torch":
        items = [(_Overhead(), input_shape), *((sub, input_shape) for sub in subnets),
                 *((_parts(subnets[i])[j], shapes[i, j]) for i, j in parts)]
        times = _time_modules(items, runtime, batch_size, threads, device, progress)
    else:
        counts = {i: len(_parts(subnets[i])) for i in split}
        exporting = [i for i in range(len(subnets)) if i not in chains]
        jobs = [(_Overhead().eval(), x, ("output",))] + [
            (_Boundaries(subnets[i]).eval(), x, _boundary_names(counts[i])) if i in counts
            else (subnets[i].eval(), x, ("output",)) for i in exporting]
        exported = _export_all(jobs, progress)
        whole, cut_parts = {}, {}
        for i, data in zip(exporting, exported[1:]):
            if i in counts:
                mine = [j for k, j in parts if k == i]
                data, cuts = _cut(data, counts[i], mine)
                cut_parts.update({(i, j): part for j, part in zip(mine, cuts)})
            whole[i] = data
        for i, chain in chains.items():
            whole[i] = _chain([cut_parts[p] for p in chain])
        graphs = [(exported[0], x), *((whole[i], x) for i in range(len(subnets)))]
        graphs += [(cut_parts[i, j], torch.randn(batch_size, *shapes[i, j], generator=generator)) for i, j in parts]
        times = _time_onnx(graphs, threads, progress)
    return times[0], times[1:1 + len(subnets)], times[1 + len(subnets):]
