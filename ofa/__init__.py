"""Once-for-All supernets with elastic kernel, depth and width, and exact subnet extraction."""

from .export import export_onnx, load_subnet, save_subnet
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticMBBlock, ElasticSqueezeAndExcite, ElasticUnit
from .flops import count_macs, count_params
from .space import ConfigSpace, SubnetConfig
from .subnet import MBBlock, SqueezeAndExcite, Subnet, Unit
from .supernet import CIFAR_UNITS, OFANet, UnitSpec
from .train import calibrate_bn

__all__ = [
    "CIFAR_UNITS", "ConfigSpace", "ElasticBatchNorm2d", "ElasticConv2d", "ElasticMBBlock",
    "ElasticSqueezeAndExcite", "ElasticUnit", "MBBlock", "OFANet", "SqueezeAndExcite", "Subnet",
    "SubnetConfig", "Unit", "UnitSpec", "calibrate_bn", "count_macs", "count_params", "export_onnx", "load_subnet",
    "save_subnet",
]
