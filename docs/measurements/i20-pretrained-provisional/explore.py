"""Exploration only (not committed): val mAP of networks, raw and with learned whitening, sym and asym."""
import os, sys, json
from pathlib import Path
import numpy as np
import torch
from amldist.checkpoints import save_checkpoint, load_network_file
from amldist.teacher_features import compute_features
from amldist.feature_store import FeatureStore
from amldist.datasets import formats
from amldist.training.plan import SplitLabels
from amldist.training.validation import ValidationSet
from amldist.whiten import learn_whitening, apply_whitening
from amldist.nets import create_net

ROOT = Path(os.environ.get("SYNTH_ROOT", "data/synth-tiny"))
SH = ROOT / "shards/retrieval-SfM-120k-128"
DB = ROOT / "train/retrieval-SfM-120k/retrieval-SfM-120k.pkl"
WDB = ROOT / "train/retrieval-SfM-120k/retrieval-SfM-120k-whiten.pkl"

def net_file(spec):
    if spec.endswith(".tar") or spec.endswith(".pth") or spec.endswith(".pt"):
        return Path(spec)
    arch, _, proj = spec.partition("+")
    path = Path(f"runs/explore-nets/{spec}.pt")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, create_net(arch, projection_dim=int(proj) if proj else None, pretrained=True), epoch=0)
    return path

def vectors(spec, split, size=128):
    path = net_file(spec)
    out = Path(f"runs/explore-feats/{path.parent.name}-{path.stem}-{split}-{size}")
    compute_features(path, SH / split, out, image_size=size)
    return FeatureStore.open(out).features.astype(np.float32)

def main(specs, teacher=None):
    val = ValidationSet.from_labels(SplitLabels.from_split(formats.read_sfm_db(DB)["val"]))
    w = formats.read_whiten_db(WDB)
    tvec = vectors(teacher, "val") if teacher else None
    tw = learn_whitening(vectors(teacher, "whiten"), w.qidxs, w.pidxs) if teacher else None
    for spec in specs:
        v = vectors(spec, "val")
        row = {"net": spec, "sym": val.mean_ap(v, v[val.query_ids])}
        own = learn_whitening(vectors(spec, "whiten"), w.qidxs, w.pidxs)
        vw = apply_whitening(v, own)
        row["sym_w"] = val.mean_ap(vw, vw[val.query_ids])
        if teacher:
            row["asym"] = val.mean_ap(tvec, v[val.query_ids])
            a, b = apply_whitening(tvec, tw), apply_whitening(v, tw)
            row["asym_w"] = val.mean_ap(a, b[val.query_ids])
        print(json.dumps({k: (round(x, 1) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)

if __name__ == "__main__":
    args = sys.argv[1:]
    teacher = None
    if "--teacher" in args:
        i = args.index("--teacher"); teacher = args[i + 1]; del args[i:i + 2]
    main(args, teacher)
