# Two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megdet-installed
SHAPES := data/shapes/annotations/instances_train.json
PATTERNS := data/patterns/val
PATTERNS64 := data/patterns64/val

.PHONY: install demo demo-classify pretrain test lint format docs bench bench-roi reproduce reproduce-quick device-wheels clean

install: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml; pip takes them from disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

$(SHAPES): | $(STAMP)
	$(PY) -m megdet data shapes --out data/shapes --train 2000 --val 200 --size 128 --seed 0

demo: $(STAMP) $(SHAPES)
	$(PY) -m megdet train --config default --nproc 2 --out runs/demo --overwrite
	$(PY) -m megdet report runs/demo

$(PATTERNS): | $(STAMP)
	$(PY) -m megdet data patterns --out data/patterns --classes 10 --train 10000 --val 2000 --size 32 --seed 0

# Goyal et al.'s recipe on the same engine: a CIFAR ResNet-20 on 32 px textured shapes.
demo-classify: $(STAMP) $(PATTERNS)
	$(PY) -m megdet train --config classify_demo --nproc 2 --out runs/classify_demo --overwrite
	$(PY) -m megdet report runs/classify_demo

$(PATTERNS64): | $(STAMP)
	$(PY) -m megdet data patterns --out data/patterns64 --classes 36 --train 18000 --val 1800 --size 64 --seed 0

# megdet pretrains the detector's own backbone (issue 26), as the MegDet-regime studies do:
# then `megdet train --config default model.backbone_weights=runs/pretrain_tiny
# model.backbone_weights_rescale=true` (docs/classification.md says why rescale).
pretrain: $(STAMP) $(PATTERNS64)
	$(PY) -m megdet train --config pretrain_tiny --nproc 2 --out runs/pretrain_tiny --overwrite
	$(PY) -m megdet report runs/pretrain_tiny

# Two test processes (pytest-xdist), one per core: most tests wait on process start-ups and
# gloo, so two at a time take ~0.7x the time of one (BENCHMARKS.md, "The test suite").
test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The manual as a site (site/): docs/config.md regenerated from megdet/config.py first, then
# mkdocs with --strict, so that a broken link or a page missing from the nav fails the build.
DOCS_STAMP := $(VENV)/.megdet-docs-installed
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m megdet config --list > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Benchmarks print ratios measured side by side in one run and append them, with the machine,
# commit and command, to BENCHMARKS.md (--record). About 45 minutes on 2 cores.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 bench/cgbn_overhead.py --images 8 --steps 20 --record
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 bench/cgbn_overhead.py --images 16 --steps 10 --record
	$(PY) bench/checkpoint_memory.py --steps 3 --record
	$(PY) bench/reference_throughput.py --record
	$(PY) bench/efficiency.py --steps 10 --record
	$(PY) bench/eval_backends.py --images 5000 --record

# The accuracy/speed study behind the demo's model.roi_batch_per_image (5 demo trainings).
bench-roi: $(STAMP) $(SHAPES)
	$(PY) bench/roi_batch_tradeoff.py --values 32,64,128,256,512 --record

# Issue 13's large-batch studies, each run a plain `megdet train` (docs/studies.md).
# Every study, at the seeds of the committed tables: about 26 hours on 2 cores. A stopped study
# continues where it stopped (finished runs are kept in experiments/runs/). Each run's result is
# also committed, as its record in experiments/results/STUDY/runs/: `make reproduce` runs every
# row again (--fresh); `make reproduce REPRODUCE=` runs only what has no record, from any machine.
REPRODUCE ?= --fresh
ADASCALE_ROWS := b16,b256,b32-adascale,b64-adascale,b128-adascale,b256-adascale,b1024-adascale-100,b16-14ep,b64-adascale-global,b256-adascale-global
DEMO_PRESET_ROWS := b16,b32,b64,b128,b256,b1024-100,b256-linear,b32-model,b64-model,b128-model,b256-model,b64-global,b256-global
GOYAL_ADASCALE_ROWS := b128,b256-adascale,b512-adascale,b1024-adascale,b2048-adascale
PRETRAIN_ROWS := b128,b256-linear,b512-linear,b1024-linear,b2048-linear,b128-plain
MEGDET_REGIME_ROWS := b16,b32,b64,b128,b256,b16-scratch,b16-from-detector,b16-frozen-body,bn2,bn8,bn32,frozen-b2,frozen-b4,frozen-b8,frozen-b16,frozen-b2-noclip,frozen-b4-noclip,frozen-b8-noclip,frozen-b16-noclip,frozen-b16-cgbn,b16-rescaled,b32-rescaled,b64-rescaled,b128-rescaled,b256-rescaled,b16-preset-rescaled,b32-adascale-rescaled,b64-adascale-rescaled,b128-adascale-rescaled,b256-adascale-rescaled,b16-from-plain,b256-from-plain,b16-frozen-plain,b256-agvm,b512,b16-from-b256,b16-from-b512,b16-from-b1024,b16-from-b2048,b16-from-b256-rescaled,b16-from-b512-rescaled,b16-from-b1024-rescaled,b16-from-b2048-rescaled,b16-from-plain-rescaled,b256-from-plain-rescaled
reproduce: $(STAMP)
	$(PY) experiments/table3_cgbn.py $(REPRODUCE) --seeds 0,1,2
	$(PY) experiments/table2_no_bn.py $(REPRODUCE) --seeds 0
	$(PY) experiments/bn_size.py $(REPRODUCE) --seeds 0,1
	$(PY) experiments/figure4.py $(REPRODUCE) --seeds 0
	$(PY) experiments/figure4_adascale.py $(REPRODUCE) --seeds 0 --rows b256-long-adascale,b16-long
	$(PY) experiments/recipe_search.py $(REPRODUCE) --seeds 0
	$(PY) experiments/agvm.py $(REPRODUCE) --seeds 0 --rows b512-sgd,b512-agvm0,b512-lr0.64-sgd,b512-lr0.64-agvm
	$(PY) experiments/agvm.py $(REPRODUCE) --seeds 0,1 --rows b256-sgd,b256-agvm
	$(PY) experiments/goyal_lr.py $(REPRODUCE) --seeds 0,1
	$(PY) experiments/goyal_warmup.py $(REPRODUCE) --seeds 0,1
	$(PY) experiments/goyal_batch.py $(REPRODUCE) --seeds 0
	$(PY) experiments/adascale.py $(REPRODUCE) --seeds 0 --rows $(ADASCALE_ROWS)
	$(PY) experiments/adascale.py $(REPRODUCE) --seeds 1 --rows b16,b32-adascale,b64-adascale,b128-adascale,b256-adascale
	$(PY) experiments/demo_preset.py $(REPRODUCE) --seeds 0 --rows $(DEMO_PRESET_ROWS)
	$(PY) experiments/goyal_adascale.py $(REPRODUCE) --seeds 0 --rows $(GOYAL_ADASCALE_ROWS)
	$(PY) experiments/projection_check.py --study demo_preset --base b16
	$(PY) experiments/projection_check.py --study demo_preset --base b64
	$(PY) experiments/pretrain.py $(REPRODUCE) --seeds 0 --rows $(PRETRAIN_ROWS)
	$(PY) experiments/megdet_regime.py $(REPRODUCE) --seeds 0 --rows $(MEGDET_REGIME_ROWS)
	$(PY) experiments/megdet_regime.py $(REPRODUCE) --seeds 1 --rows b16,b256,b16-rescaled,b32-rescaled,b64-rescaled,b128-rescaled,b256-rescaled,b16-preset-rescaled,b32-adascale-rescaled,b64-adascale-rescaled,b128-adascale-rescaled,frozen-b2-noclip,frozen-b4-noclip,frozen-b8-noclip,frozen-b16-noclip

# One row of each study on a quarter of its data, to experiments/results/quick/: about 20 minutes.
reproduce-quick: $(STAMP)
	$(PY) experiments/table3_cgbn.py --quick --rows b256
	$(PY) experiments/table2_no_bn.py --quick --rows b128
	$(PY) experiments/bn_size.py --quick --rows bn32
	$(PY) experiments/figure4.py --quick --rows b256-long
	$(PY) experiments/recipe_search.py --quick --rows b128-warmup3-clip1
	$(PY) experiments/agvm.py --quick --rows b256-agvm
	$(PY) experiments/goyal_lr.py --quick --rows b1024-k
	$(PY) experiments/goyal_warmup.py --quick --rows none
	$(PY) experiments/goyal_batch.py --quick --rows b256
	$(PY) experiments/adascale.py --quick --rows b256-adascale
	$(PY) experiments/demo_preset.py --quick --rows b64
	$(PY) experiments/megdet_regime.py --quick --rows b256

# What bench/device_suite.sh carries to the GPU machine (python 3.12, no registry there).
device-wheels:
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pycocotools==2.0.10 faster-coco-eval==1.8.0

clean:
	rm -rf runs .pytest_cache .ruff_cache
