"""Stage download: fetch and verify the dataset, save uint8 train/val/test tensors to data/prepared."""

from ofa.pipeline import download, process

process.main(download.download, parallel=False)  # one process: nothing in it divides among several
