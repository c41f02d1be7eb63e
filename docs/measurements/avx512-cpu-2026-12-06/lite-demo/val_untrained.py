"""Validation mAP (%) of networks with no training: ImageNet backbones (ARCH or ARCH+D for a random 1x1
projection to D) or checkpoint files, each at an image size (SPEC@SIZE). Shards at that size must exist
(`amldist data shards --root data/synth-tiny --dataset retrieval-SfM-120k --image-size SIZE`).

    PYTHONPATH=. python docs/measurements/avx512-cpu-2026-12-06/lite-demo/val_untrained.py \
        efficientnet_lite0@128 efficientnet_lite2+128@128 runs/X/model_best.pth.tar@192
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "i20-pretrained-provisional"))
import explore  # noqa: E402  (the provisional folder's harness: network files and feature stores)

from amldist.datasets import formats  # noqa: E402
from amldist.training.plan import SplitLabels  # noqa: E402
from amldist.training.validation import ValidationSet  # noqa: E402

val = ValidationSet.from_labels(SplitLabels.from_split(formats.read_sfm_db(explore.DB)["val"]))
for arg in sys.argv[1:]:
    spec, _, size = arg.rpartition("@")
    explore.SH = explore.ROOT / f"shards/retrieval-SfM-120k-{size}"
    v = explore.vectors(spec, "val", int(size))
    print(json.dumps({"net": spec, "size": int(size), "val_sym": round(val.mean_ap(v, v[val.query_ids]), 1)}),
          flush=True)
