# make setup: the virtual environment in .venv (TORCH_INDEX=<url>: where pip gets torch, e.g. its CPU index)
# make test:  the test suite (CPU, about 7 minutes: 2 pytest-xdist workers, whole test files each)
# make quick: the whole pipeline on Fashion-MNIST on the CPU, as a DVC experiment (7 to 10 minutes on 2 cores)
# make bench: speed benchmarks (print figures)
VENV ?= .venv
PY := $(VENV)/bin/python
# stage commands call `python`: the venv's, also when the shell has not activated it
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

# The quick profile: params.yaml with these overrides (dvc exp run -S). Real data, offline: the official
# Fashion-MNIST files from /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist). All 55000
# training images: the supernet sees every one three times, each shrink stage a fresh draw of them
# (images_per_epoch), the width stage the most, at half the earlier shrink rates (docs/benchmarks.md: "The quick
# profile" measures the options). The latency table is checked against the uniform configs alone
# (latency.validate=0): each whole subnet costs an export, 3-4 s here. Evaluation and BN re-calibration in
# batches of 250 (train.eval_batch_size): twice as fast as 1000 on this CPU (benchmarks/evaluation.py).
QUICK_PARAMS := \
	data.dataset=fashion_mnist \
	net.stem_stride=2 net.final_channels=256 \
	'net.units=[{channels:16,stride:2,activation:relu,se:false},{channels:32,stride:1,activation:relu,se:true},{channels:48,stride:2,activation:hswish,se:true}]' \
	train.device=cpu train.batch_size=256 train.warmup_epochs=0.3 train.crop_padding=0 train.flip=false \
	train.eval_batch_size=250 \
	supernet.epochs=3 supernet.lr=0.2 \
	shrink.sample=sandwich \
	shrink.kernel.epochs=1 shrink.kernel.lr=0.01 shrink.kernel.images_per_epoch=7500 \
	shrink.depth.epochs=1 shrink.depth.lr=0.01 shrink.depth.images_per_epoch=7500 \
	shrink.width.epochs=1 shrink.width.lr=0.03 shrink.width.images_per_epoch=40000 \
	evaluate.finetune.epochs=1 evaluate.finetune.lr=0.01 evaluate.finetune.images_per_epoch=1500 \
	'specialize.budgets=[1500000,2000000,2500000,3000000]' specialize.trials=24 \
	latency.validate=0 \
	'baseline.configs=[min]' baseline.epochs=1

.PHONY: setup test quick bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	# torch first, pinned. The CPU build comes from the wheels pip is configured to find (PIP_FIND_LINKS on the
	# development machine); where pip sees only PyPI, whose torch 2.13.0 is the CUDA build with several GB of
	# nvidia packages, name PyTorch's CPU index: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	# the dependencies' own dependencies at the versions in constraints.txt too
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

quick: setup
	$(RUN) dvc exp run $(addprefix -S ,$(QUICK_PARAMS))
	$(RUN) python -m ofa.pipeline.summary

bench: setup
	$(PY) benchmarks/elastic_overhead.py
	$(PY) benchmarks/cost.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/stage_exit.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/depthwise.py $(addprefix -S ,$(QUICK_PARAMS))
	$(PY) benchmarks/evaluation.py $(addprefix -S ,$(QUICK_PARAMS))
	# the quick profile's schedule projected from measured speeds (make quick measures it whole)
	$(PY) benchmarks/schedule.py $(addprefix -S ,$(QUICK_PARAMS))
