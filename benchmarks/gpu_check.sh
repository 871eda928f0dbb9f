#!/usr/bin/env bash
# The first checks on a GPU machine, as one command: the CUDA tests (tests/test_cuda.py and the CUDA
# augmentation test), then the projected wall time of the params' whole schedule from speeds measured there
# (images/s of every training phase, calibration, evaluation and fine-tuning; the peak GPU memory). It needs
# only torch, pyyaml, tqdm, Pillow, onnx, onnxruntime and pytest on that machine, not this project's
# environment (the stages' own test is skipped without dvclive, optuna, calflops and matplotlib). Logs go to $OUT
# (default /tmp/gpu-check).
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine, from the project root
#   OUT=/tmp/check DEVICE=cpu STEPS=2 PARAMS=my.yaml bash benchmarks/gpu_check.sh   # the same on a CPU
#
# Exit status: that of the tests, else of the benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-50}
PARAMS=${PARAMS:-params.yaml}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices:",
        *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))' 2>&1
    nvidia-smi 2>&1 || true
} > "$OUT/machine.txt"
head -2 "$OUT/machine.txt"

echo "== tests on $DEVICE"
OFA_TEST_DEVICE=$DEVICE timeout 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
    tests/test_data.py -k "cuda or device" 2>&1 | tee "$OUT/tests.txt"
tests=$?

echo "== the schedule of $PARAMS on $DEVICE, $STEPS steps per measurement"
timeout 420 "$PYTHON" benchmarks/schedule.py --params "$PARAMS" --device "$DEVICE" --steps "$STEPS" 2>&1 \
    | tee "$OUT/schedule.txt"
schedule=$?

[ "$tests" -ne 0 ] && exit "$tests"
exit "$schedule"
