#!/usr/bin/env bash
# The search docs/TUNING.md shows (issue 18's "Done when" command): the demo's Contr+ student preset,
# lr x margin, 4 trials, local Ray. Times it from outside and copies its results into OUT_DIR:
# results.csv, results.json, best.yaml, search.png, and run.json (command, wall seconds, load average
# before and after, CPU count). Needs the tiny demo's data and teacher (`amldist demo --preset tiny`, or its data and
# teacher stages); run from the repository root.
#
#   bash scripts/tune_example.sh docs/measurements/<machine-date>/tune-search
set -euo pipefail
OUT_DIR=${1:?usage: bash scripts/tune_example.sh OUT_DIR}
BIN=${VENV:-.venv}/bin
NAME=tune-example
STORAGE=runs/tune-example
rm -rf "${STORAGE:?}/$NAME"   # a new search refuses a folder that holds one
COMMAND=("$BIN/amldist" tune --config presets/tiny-student-contrplus-asym.yaml
         --search 'optim.lr=loguniform(1e-4,1e-2)' --search 'loss.margin=uniform(0.6,1.0)'
         --num-samples 4 --local --storage "$STORAGE" --name "$NAME")
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s.%N)
"${COMMAND[@]}"
END=$(date +%s.%N)
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$OUT_DIR"
cp "$STORAGE/$NAME"/{results.csv,results.json,best.yaml,search.png} "$OUT_DIR/"
"$BIN/python" - "$OUT_DIR/run.json" "$START" "$END" "$LOAD_BEFORE" "$LOAD_AFTER" "$(printf '%q ' "${COMMAND[@]:1}")" <<'PY'
import json, os, sys
out, start, end, before, after, command = sys.argv[1:]
record = {"command": "amldist " + command.strip(), "wall_s": round(float(end) - float(start), 1),
          "load_before": [float(x) for x in before.split()], "load_after": [float(x) for x in after.split()],
          "cpus": os.cpu_count()}
with open(out + ".tmp", "w") as handle:
    json.dump(record, handle, indent=2)
os.replace(out + ".tmp", out)
print(f"{record['wall_s']} s; wrote {out}")
PY
