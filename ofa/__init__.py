"""Once-for-All supernets with elastic kernel, depth and width, and exact subnet extraction."""

from .deploy import AccuracyPredictor, LatencyTable, export_onnx, load_subnet, measure_latency, save_subnet
from .model import (CIFAR_UNITS, ConfigSpace, ElasticBatchNorm2d, ElasticConv2d, ElasticMBBlock,
                    ElasticSqueezeAndExcite, ElasticUnit, MBBlock, OFANet, SqueezeAndExcite, Subnet, SubnetConfig,
                    Unit, UnitSpec, count_macs, count_params)
from .train import calibrate_bn

__all__ = [
    "AccuracyPredictor", "CIFAR_UNITS", "ConfigSpace", "LatencyTable", "ElasticBatchNorm2d", "ElasticConv2d", "ElasticMBBlock",
    "ElasticSqueezeAndExcite", "ElasticUnit", "MBBlock", "OFANet", "SqueezeAndExcite", "Subnet",
    "SubnetConfig", "Unit", "UnitSpec", "calibrate_bn", "count_macs", "count_params", "export_onnx", "load_subnet",
    "measure_latency", "save_subnet",
]
