"""Stage shrink_width: progressive shrinking, elastic width (sort channels, then sample kernel, depth and width)."""

from ofa import pipeline

pipeline.main(lambda params: pipeline.train_stage(params, "shrink_width"))
