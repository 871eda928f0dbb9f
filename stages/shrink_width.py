"""Stage shrink_width: progressive shrinking, elastic width (sort channels, then sample kernel, depth and width)."""

from ofa.pipeline import process, training

process.main(lambda params: training.train_stage(params, "shrink_width"))
