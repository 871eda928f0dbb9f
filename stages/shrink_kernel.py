"""Stage shrink_kernel: progressive shrinking, elastic kernel (sample kernels per block)."""

from ofa import pipeline

pipeline.main(lambda params: pipeline.train_stage(params, "shrink_kernel"))
