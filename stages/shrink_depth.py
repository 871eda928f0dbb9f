"""Stage shrink_depth: progressive shrinking, elastic depth (sample kernel and depth)."""

from ofa import pipeline

pipeline.main(lambda params: pipeline.train_stage(params, "shrink_depth"))
