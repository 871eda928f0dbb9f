"""Stage shrink_depth: progressive shrinking, elastic depth (sample kernel and depth)."""

from ofa.pipeline import process, training

process.main(lambda params: training.train_stage(params, "shrink_depth"))
