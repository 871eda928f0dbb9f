"""Deploying subnets: ``search`` finds the most accurate subnet within a budget (NSGA-II over per-block configs),
``export`` writes a subnet as ONNX and as a saved module, ``latency`` predicts a subnet's latency on a device
from a table of its parts measured there (``timing`` measures).

Stands on ``ofa.model`` and ``ofa.io``.
"""

from .export import ExportError, export_onnx, load_subnet, save_subnet
from .latency import LatencyError, LatencyTable
from .timing import measure_latency, measure_many, measure_onnx

__all__ = ["ExportError", "LatencyError", "LatencyTable", "export_onnx", "load_subnet", "measure_latency",
           "measure_many", "measure_onnx", "save_subnet"]
