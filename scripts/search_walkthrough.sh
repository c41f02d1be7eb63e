#!/usr/bin/env bash
# docs/SEARCH.md's figures and examples, written into one folder by the commands the doc shows:
# `amldist demo --search` (the demo, its finished stages reused, then export / index / search from the
# exported students), then the doc's `amldist search / export / index` examples on the demo's files.
# Run from the repository root with the venv's bin first on PATH:
#
#     PATH=$PWD/.venv/bin:$PATH bash scripts/search_walkthrough.sh OUT_DIR [DEMO_PRESET]
#
# OUT_DIR receives stages.txt (the demo's stage lines), search.md, search.json and contact_sheet.png
# (as the demo writes them) and commands.txt (each example command and its output). DEMO_PRESET is
# tiny (the from-scratch demo, whose figures docs/SEARCH.md shows) unless given; lite (`make demo`'s) uses
# the ImageNet-pretrained EfficientNet-Lite networks.
set -euo pipefail

OUT=${1:?usage: scripts/search_walkthrough.sh OUT_DIR [DEMO_PRESET]}
PRESET=${2:-tiny}
mkdir -p "$OUT"

amldist demo --preset "$PRESET" --search 2>&1 | tee "$OUT/stages.txt"

# The demo's paths and the first ROxford5k query (its box), from the library (one home for each).
eval "$(python - "$PRESET" <<'EOF'
import shlex
import sys

from amldist.datasets import formats, layout
from amldist.demo.search import SEARCH_DIR
from amldist.demo.settings import demo_settings
from amldist.training.state import BEST_FILE

settings = demo_settings(sys.argv[1])
runs = {run.key: settings.run_dir(run) / BEST_FILE for run in settings.student_runs}
query = formats.list_images(settings.data_root, "roxford5k")["query"][0]
values = {
    "SEARCH": settings.report_dir / SEARCH_DIR, "SIZE": settings.test_image_size,
    "TEACHER": settings.run_dir(settings.teacher_run) / BEST_FILE, "REG": runs["reg"],
    "BASELINE": runs["baseline"], "QUERY": query.path, "BBX": ",".join(f"{v:g}" for v in query.bbx),
    "JPG": query.path.parent,
    "PARIS_DB": layout.shards_dir(settings.data_root, "rparis6k", settings.test_image_size) / "db",
}
for name, value in values.items():
    print(f"{name}={shlex.quote(str(value))}")
EOF
)"

cp "$SEARCH/search.md" "$SEARCH/search.json" "$SEARCH/contact_sheet.png" "$OUT/"
: > "$OUT/commands.txt"
# Each command and its output; a refusal (exit 2) is part of the record, not a failure of the script.
step() { echo "\$ $*" >> "$OUT/commands.txt"; "$@" >> "$OUT/commands.txt" 2>&1 || echo "(exit $?)" >> "$OUT/commands.txt"; }

step amldist search --index "$SEARCH/index-roxford5k" --query-network "$SEARCH/contrplus.onnx" \
    --image "$QUERY" --bbx "$BBX" -k 10 --contact-sheet "$SEARCH/sheet-cli.png"
step amldist search --index "$SEARCH/index-roxford5k" --query-network "$BASELINE" --image "$QUERY"
step amldist export --network "$REG" --format torchscript --out "$SEARCH/reg.pt" --images "$JPG" --force
step amldist index --network "$TEACHER" --shards "$PARIS_DB" \
    --out "$SEARCH/index-rparis6k-ivfpq" --image-size "$SIZE" --compress --force
cat "$OUT/commands.txt"
