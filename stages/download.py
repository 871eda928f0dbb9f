"""Stage download: fetch and verify the dataset, save uint8 train/test tensors to data/prepared."""

from ofa import pipeline

pipeline.main(pipeline.download)
