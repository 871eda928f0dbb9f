"""Datasets for Once-for-All training: ``prepare`` makes the uint8 splits of a dataset; ``augment`` crops and
flips a batch on its device.

Supported datasets are CIFAR-10 and CIFAR-100 and Fashion-MNIST (``archives``: the official files, fetched
and verified by ``remote``), a folder of the user's own images (``folder``) and a tiny deterministic
synthetic dataset (``prepare``). ``prepare`` returns a ``Dataset`` (``splits``): the splits and the class
names in label order. ``check_fits`` (``memory``) turns "not enough memory" into a one-line error before a
large tensor is made. No torchvision and no pickle: splits are saved as plain tensors and loaded with
``torch.load(weights_only=True)``. Stands on ``ofa.io`` alone.
"""

from .archives import (CIFAR10_CLASSES, CIFAR10_FILES, CIFAR100_FILES, FASHION_MNIST_CLASSES, FASHION_MNIST_FILES,
                       FASHION_MNIST_SYSTEM_DIR)
from .augment import augment
from .folder import FOLDER_LAYOUT, IMAGE_EXTENSIONS
from .memory import available_memory, check_fits
from .prepare import (DATASETS, MIN_IMAGE_SIZE, NATIVE, SYNTHETIC_CLASSES, TRAIN_IMAGES, prepare, resize_split,
                      synthetic)
from .remote import RemoteFile, fetch
from .splits import DataError, Dataset, Preview, Split, channel_stats, hold_out, load_split, save_split

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_FILES",
    "CIFAR100_FILES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "FOLDER_LAYOUT",
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIZE",
    "NATIVE",
    "SYNTHETIC_CLASSES",
    "TRAIN_IMAGES",
    "DataError",
    "Dataset",
    "RemoteFile",
    "Split",
    "augment",
    "available_memory",
    "channel_stats",
    "check_fits",
    "fetch",
    "hold_out",
    "load_split",
    "prepare",
    "Preview",
    "resize_split",
    "save_split",
    "synthetic",
]
