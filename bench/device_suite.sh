#!/usr/bin/env bash
# Every GPU figure in one command (issue 18), on a machine with one GPU and 16 cores whose own
# python3 has a CUDA torch and which reaches no package registry:
#
#     bash bench/device_suite.sh            # on the GPU machine, about 7 minutes
#     bash bench/device_suite.sh --dry-run  # here, on any CPU: every step at toy sizes (~40 s)
#
# The wheels megdet needs beyond that machine's packages (pycocotools, faster-coco-eval) are
# fetched here by `make device-wheels` into .whl/ and carried along. Each step prints its
# table in the BENCHMARKS.md format; a failing step is reported and the next one still runs.
# Exit status: the number of failed steps.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=""
DEVICE=cuda
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY="--dry-run"
    DEVICE=cpu
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
steps=0

run_step() {
    local name=$1
    shift
    echo "## $name: $*"
    local begin=$SECONDS
    if timeout "${STEP_LIMIT:-300}" "$@"; then
        echo "## $name: done in $((SECONDS - begin)) s"
    else
        echo "## $name: FAILED (exit $?) after $((SECONDS - begin)) s"
    fi
}

# On the GPU machine the steps run one after another (each owns the GPU). The dry run only
# checks that every step still works: its steps run side by side, each printed whole, in order.
step() {
    steps=$((steps + 1))
    local log
    log="$LOGS/$(printf %02d $steps)"
    if [[ -n $DRY ]]; then
        run_step "$@" >"$log" 2>&1 &
    else
        run_step "$@" 2>&1 | tee "$log"
    fi
}

if [[ -z $DRY ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/megdet-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/megdet-site"
    fi
    # megdet itself, without touching the machine's torch (pinned to another version here).
    $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed: megdet runs from PYTHONPATH"
fi

step environment $PY -c "
import os, torch, torchvision
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, {gpu}, {os.cpu_count()} CPUs')"
for part in throughput bn; do
    step "$part" $PY bench/device_figures.py "$part" $DRY
done
# Dry run: only that the selection holds; `make test` runs these tests on the CPU anyway.
step "device tests" $PY -m pytest -q -m device --device "$DEVICE" -p no:cacheprovider ${DRY:+--collect-only}
for part in memory scaling; do
    step "$part" $PY bench/device_figures.py "$part" $DRY
done
wait
if [[ -n $DRY ]]; then
    cat "$LOGS"/*
fi
failures=$(cat "$LOGS"/* | grep -c '^## .*: FAILED (exit')
echo "## device suite: $failures failed step(s)"
exit "$failures"
