"""Stage train_supernet: train the supernet at its max config."""

from ofa.pipeline import process, training

process.main(lambda params: training.train_stage(params, "train_supernet"))
