"""What a subnet is and what it costs: the config space, the elastic supernet, its static subnets, exact MACs.

Imports nothing else of ``ofa``: every other package stands on this one.
"""

from .cost import macs, num_params
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticMBBlock, ElasticSqueezeAndExcite, ElasticUnit
from .flops import count_macs, count_params
from .space import ConfigSpace, SubnetConfig
from .subnet import MBBlock, SqueezeAndExcite, Subnet, Unit
from .supernet import CIFAR_UNITS, OFANet, UnitSpec, architecture

__all__ = [
    "CIFAR_UNITS", "ConfigSpace", "ElasticBatchNorm2d", "ElasticConv2d", "ElasticMBBlock",
    "ElasticSqueezeAndExcite", "ElasticUnit", "MBBlock", "OFANet", "SqueezeAndExcite", "Subnet", "SubnetConfig",
    "Unit", "UnitSpec", "architecture", "count_macs", "count_params", "macs", "num_params",
]
