"""Stage train_supernet: train the supernet at its max config."""

from ofa import pipeline

pipeline.main(lambda params: pipeline.train_stage(params, "train_supernet"))
