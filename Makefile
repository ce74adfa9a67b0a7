# Two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megdet-installed
SHAPES := data/shapes/annotations/instances_train.json

.PHONY: install demo test lint format bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Benchmarks print ratios measured side by side in one run; record them in BENCHMARKS.md.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 bench/cgbn_overhead.py --images 8 --steps 20
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 bench/cgbn_overhead.py --images 16 --steps 10
	$(PY) bench/checkpoint_memory.py --steps 3
	$(PY) bench/reference_throughput.py --iters 60
	$(PY) bench/efficiency.py --steps 10

clean:
	rm -rf runs .pytest_cache .ruff_cache
