"""What a subnet is and what it costs: the config space, the elastic supernet, its static subnets, exact MACs.

Imports nothing else of ``ofa``: every other package stands on this one.
"""

from .cost import macs, num_params
from .depthwise import DepthwiseConv2d, depthwise_conv2d
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticMBBlock, ElasticSqueezeAndExcite, ElasticUnit
from .flops import count_macs, count_params
from .space import ConfigSpace, SubnetConfig
from .subnet import MBBlock, SqueezeAndExcite, Subnet, Unit, fold_batch_norm
from .supernet import CIFAR_UNITS, OFANet, UnitSpec, architecture

__all__ = [
    "CIFAR_UNITS", "ConfigSpace", "DepthwiseConv2d", "ElasticBatchNorm2d", "ElasticConv2d", "ElasticMBBlock",
    "ElasticSqueezeAndExcite", "ElasticUnit", "MBBlock", "OFANet", "SqueezeAndExcite", "Subnet", "SubnetConfig",
    "Unit", "UnitSpec", "architecture", "count_macs", "count_params", "depthwise_conv2d", "fold_batch_norm", "macs",
    "num_params",
]
