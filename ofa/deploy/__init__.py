"""Deploying subnets: ``search`` finds the most accurate subnet within a budget (NSGA-II over per-block configs),
``export`` writes a subnet as ONNX and as a saved module, ``latency`` predicts a subnet's latency on a device
from a table of its parts measured there (``timing`` measures), ``predictor`` predicts a subnet's accuracy from its
config.

Stands on ``ofa.model`` and ``ofa.io``.
"""

from .export import ExportError, export_onnx, export_onnx_many, load_subnet, save_subnet
from .latency import LatencyError, LatencyTable
from .predictor import AccuracyPredictor, PredictorError
from .timing import measure_latency, measure_many, measure_onnx, measure_onnx_many

__all__ = ["AccuracyPredictor", "ExportError", "LatencyError", "LatencyTable", "PredictorError", "export_onnx",
           "export_onnx_many", "load_subnet", "measure_latency", "measure_many", "measure_onnx", "measure_onnx_many",
           "save_subnet"]
