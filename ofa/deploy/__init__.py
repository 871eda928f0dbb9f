"""Deploying subnets: ``search`` finds the most accurate subnet within a budget (NSGA-II over per-block configs),
``export`` writes a subnet as ONNX and as a saved module.

Stands on ``ofa.model`` and ``ofa.io``.
"""

from .export import ExportError, export_onnx, load_subnet, save_subnet

__all__ = ["ExportError", "export_onnx", "load_subnet", "save_subnet"]
