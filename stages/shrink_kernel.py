"""Stage shrink_kernel: progressive shrinking, elastic kernel (sample kernels per block)."""

from ofa.pipeline import process, training

process.main(lambda params: training.train_stage(params, "shrink_kernel"))
