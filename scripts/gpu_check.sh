#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine: the GPU tests (the faiss-gpu index too, when faiss
# with GPU support is there or brought in .whl/), the training-step, mining and extraction benchmarks on
# the GPU, and a short training run of the tiny asym Contr+ student through the one-process trainer (NCCL
# group, bf16, torch-cuda miner). Such a machine has torch but no Ray, wandb or webdataset, which no check
# needs; the GPU tests and the mining benchmark import faiss (amldist.search), so where faiss is missing
# bring its wheels in .whl/ (see "faiss with GPU support" below).
#
#   bash scripts/gpu_check.sh [PART ...]   # parts: tests step run mining extract (default: all)
#
# Results in $OUT (default runs/gpu): log.txt and one JSON file per benchmark.
#
# The training run needs the tiny demo's data, teacher and feature stores (`amldist demo --preset tiny` first, then bring
# data/synth-tiny and runs/tiny-teacher-contr-sym along); without them it is skipped.
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AMLDIST_NO_PROGRESS=1
LOG="$OUT/log.txt"
: > "$LOG"
PARTS=" ${*:-tests step run mining extract} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
step() { echo "== $1 ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; }

step "device"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"

if want tests; then
step "faiss with GPU support"
# The lent machine has no faiss and no internet. Wheels brought along in .whl/ (gitignored; name it in the
# device tool's carry) are installed beside this run, e.g. from a machine with a package index:
#   pip download --no-deps --only-binary :all: --python-version 3.11 -d .whl faiss-gpu-cu12
# With faiss-gpu installed the faiss-gpu test must run (AMLDIST_REQUIRE_FAISS_GPU=1); without it that test
# is skipped and the log says the path was not tested. (faiss-gpu-cu12 needs CUDA 12's cuBLAS and runtime.)
FAISS_SITE=${TMPDIR:-/tmp}/amldist-faiss-site
if ls .whl/faiss*.whl >/dev/null 2>&1; then
    run "$PY" -m pip install -q --no-deps --no-index --target "$FAISS_SITE" .whl/faiss*.whl
    export PYTHONPATH="$FAISS_SITE:$PYTHONPATH" AMLDIST_REQUIRE_FAISS_GPU=1
fi
run "$PY" -c "from amldist.search import faiss_gpu_available as a; print('faiss-gpu usable:', a())" \
    || echo "faiss-gpu path NOT tested: faiss does not import here" | tee -a "$LOG"
step "GPU tests"
AMLDIST_TEST_GPU=1 run timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py \
    tests/test_mining.py
fi

if want step; then
step "training step: ours vs the reference loop"
run timeout 150 "$PY" benchmarks/bench_train.py --device cuda --steps 3
cp runs/bench/train-cuda.json "$OUT/" 2>/dev/null
fi

if want run; then
step "training run: tiny asym Contr+ student, one process, NCCL"
if [ -f runs/tiny-teacher-contr-sym/model_best.pth.tar ] && [ -d data/synth-tiny ]; then
    run timeout 150 "$PY" scripts/train_one_process.py --config presets/tiny-student-contrplus-asym.yaml \
        --device cuda --out "$OUT/train-run-cuda.json"
else
    echo "skipped: no tiny demo data or teacher here" | tee -a "$LOG"
fi
fi

if want mining; then
step "mining: reference vs ours on the GPU, miner latency"
run timeout 150 "$PY" benchmarks/bench_mining.py --device cuda --pools 22000,100000,500000,1000000,2000000 \
    --out "$OUT/mining-cuda.json"
fi

if want extract; then
step "extraction: one image at a time vs buckets"
# 64 images and 12 decoding processes: with 16 images and 2 processes JPEG decoding bounded both passes.
run timeout 120 "$PY" benchmarks/bench_extract.py --device cuda --archs resnet18,mobilenet_v2,resnet101 \
    --images 64 --workers 12
cp runs/bench/extract.json "$OUT/extract-cuda.json" 2>/dev/null
fi

step "done"
