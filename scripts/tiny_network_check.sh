#!/usr/bin/env bash
# Which networks learn from scratch on the tiny synthetic data within CPU-minutes? Trains each
# variant with the same budget through `amldist train` (the tiny teacher preset: contrastive, hard
# mining, sym, Adam 1e-3, 128 px), evaluates it with `amldist eval` (single scale, no whitening) and
# prints medium/hard mAP on the synthetic ROxford5k / RParis6k. This is how the tiny presets' networks
# and BatchNorm rule were chosen (docs/TRAINING.md, "The tiny presets").
#
#   bash scripts/tiny_network_check.sh [EPOCHS]      # default 8 epochs x 160 tuples; needs data/synth-tiny
#   TABLE=docs/measurements/MACHINE/tiny-network-check.md bash scripts/tiny_network_check.sh   # keep the table
set -euo pipefail
EPOCHS=${1:-8}
OUT=runs/tiny-check
TABLE=${TABLE:-$OUT/table.md}
BIN=${VENV:-.venv}/bin
ROOT=data/synth-tiny
test -f "$ROOT/synth.json" || "$BIN/amldist" data synth --preset tiny --root "$ROOT"
test -d "$ROOT/shards/retrieval-SfM-120k-128/train" || "$BIN/amldist" data shards --root "$ROOT" --dataset retrieval-SfM-120k --image-size 128

# name: overrides on top of presets/tiny-teacher-contr-sym.yaml
VARIANTS=(
  "resnet18:--set model.arch=resnet18"
  "mobilenet_v2:--set model.arch=mobilenet_v2"
  "small_cnn-frozen-bn:--set model.arch=small_cnn --set model.freeze_batchnorm=true"
  "small_cnn:--set model.arch=small_cnn"
  "wide_cnn:--set model.arch=wide_cnn"
)
for variant in "${VARIANTS[@]}"; do
  name=${variant%%:*}
  # shellcheck disable=SC2086  # the overrides are meant to split into words
  set -- ${variant#*:}
  if [ ! -f "$OUT/$name.eval.json" ]; then
    start=$(date +%s)
    "$BIN/amldist" train --preset tiny-teacher-contr-sym --local --num-workers 2 --wandb off --storage "$OUT" \
      --name "$name" --set run.epochs="$EPOCHS" "$@"
    echo "$name: trained in $(( $(date +%s) - start )) s" | tee "$OUT/$name.time"
    "$BIN/amldist" eval --network "$OUT/$name/model_best.pth.tar" --data-root "$ROOT" --image-size 128 \
      --datasets roxford5k,rparis6k --out "$OUT/$name.eval.json"
  fi
done
mkdir -p "$(dirname "$TABLE")"
"$BIN/python" - "$OUT" "${VARIANTS[@]%%:*}" <<'PY' | tee "$TABLE"
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
print("| network | ROxf M | RPar M | ROxf H | RPar H | best val mAP | training s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in names:
    sym = json.loads((out / f"{name}.eval.json").read_text())["results"]["sym"]
    cells = [sym[d]["raw"][s]["mAP"] for s in ("medium", "hard") for d in ("roxford5k", "rparis6k")]
    metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = max(m.get("val_map_sym", 0.0) for m in metrics)
    seconds = (out / f"{name}.time").read_text().split()[-2]
    print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {val:.1f} | {seconds} |")
PY
