"""Training a supernet or a subnet: the loop, evaluation and BN re-calibration, resume states, several processes.

Stands on ``ofa.model``, ``ofa.data`` and ``ofa.io``; knows nothing of stages or params files.
"""

from .device_data import SPLITS, DeviceData, select_device
from .evaluation import calibrate_bn, evaluate, subnet_accuracy
from .loop import REDUCE, SYNC_EVERY, DivergenceError, EpochStats, Schedule, fit, soft_cross_entropy

__all__ = [
    "REDUCE", "SPLITS", "SYNC_EVERY", "DeviceData", "DivergenceError", "EpochStats", "Schedule", "calibrate_bn",
    "evaluate", "fit", "select_device", "soft_cross_entropy", "subnet_accuracy",
]
