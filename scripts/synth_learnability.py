"""Is the synthetic data neither trivial nor unlearnable? mAP before and after a short training.

    nice .venv/bin/python scripts/synth_learnability.py --root data/synth-tiny --preset tiny

Generates the root if needed (idempotent), then reports revisited mAP (easy/medium/hard) on the
synthetic roxford5k and rparis6k of:
  (0) an 8x8 colour thumbnail, no network at all: what colour layout alone gives;
  (a) small_cnn + GeM with random weights (amldist.nets), untrained;
  (b) the same network after --steps steps of contrastive training (amldist.losses, paper form,
      margin 0.7) on the SfM train pairs, per --mining: hard negatives mined every --mine-every
      steps with the current network (cirtorch's rule: most similar first, one per cluster, never
      the query's cluster) or random negatives from other clusters.
Extraction and mAP are the project's own (amldist.extract.embed, amldist.evaluate). Results go to
stdout and --out (JSON). Training runs on the CPU with --threads threads; its CPU seconds are
reported beside the wall seconds, which depend on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amldist.datasets import formats, layout
from amldist.evaluate import evaluate_descriptors
from amldist.extract import FileSource, embed, prepare_image
from amldist.losses import contrastive_loss
from amldist.nets import create_net
from amldist.synth import generate
from amldist.synth.plan import TEST_NAMES, TRAIN_NAME

log = logging.getLogger("synth_learnability")
NUM_NEGATIVES = 5


def test_scores(descriptor_fn, root: Path) -> dict[str, dict[str, float]]:
    """mAP ×100 per test set and setting, for descriptors from `descriptor_fn(records) -> (N, D)`."""
    out = {}
    for name in TEST_NAMES:
        records = formats.list_images(root, name)
        truth = formats.read_gnd(layout.gnd_path(root, name))
        result = evaluate_descriptors(descriptor_fn(records["db"]), descriptor_fn(records["query"]),
                                      truth.gnd)
        out[name] = {setting: round(result[setting]["mAP"], 2) for setting in ("easy", "medium", "hard")}
    return out


def thumbnail_descriptors(records, image_size: int) -> np.ndarray:
    """8x8 RGB thumbnails of the (bbx-cropped) images, centred and L2-normalised: (N, 192)."""
    source = FileSource.from_records(records)
    rows = []
    for i in range(len(source)):
        small = prepare_image(source, i, image_size).resize((8, 8), Image.Resampling.BOX)
        v = np.asarray(small, dtype=np.float32).ravel()
        rows.append(v - v.mean())
    x = np.stack(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)


def network_descriptors(net, image_size: int):
    return lambda records: embed(net, FileSource.from_records(records), image_size=image_size, batch_size=32)


def load_training_images(records, image_size: int) -> list[torch.Tensor]:
    """Every train image once, resized as for extraction: list of (3, h, w) uint8."""
    source = FileSource.from_records(records)
    return [torch.from_numpy(np.asarray(prepare_image(source, i, image_size)).copy()).permute(2, 0, 1)
            for i in range(len(source))]


def forward_images(net, images: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """Descriptors of images[indices] (len, D): same-shape images go through the network together."""
    mean = torch.tensor(net.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.meta.std).view(1, 3, 1, 1)
    by_shape: dict[tuple, list[int]] = {}
    for position, index in enumerate(indices):
        by_shape.setdefault(tuple(images[index].shape), []).append(position)
    out = [None] * len(indices)
    for positions in by_shape.values():
        batch = torch.stack([images[indices[p]] for p in positions]).float().div(255.0)  # (b, 3, h, w)
        for p, row in zip(positions, net((batch - mean) / std)):
            out[p] = row
    return torch.stack(out)  # (len, D)


def choose_negatives(rng: np.random.Generator, queries: np.ndarray, cluster: np.ndarray, mining: str,
                     net=None, images=None) -> np.ndarray:
    """(Q, NUM_NEGATIVES) negatives: each from a different cluster, never the query's."""
    if mining == "hard":
        with torch.no_grad():
            net.eval()
            pool = np.concatenate([
                forward_images(net, images, list(range(s, min(s + 64, len(images))))).numpy()
                for s in range(0, len(images), 64)])  # (N, D)
            net.train()
        order = np.argsort(-(pool[queries] @ pool.T), axis=1)  # (Q, N), most similar first
    else:
        order = np.stack([rng.permutation(len(cluster)) for _ in queries])
    negatives = np.empty((len(queries), NUM_NEGATIVES), dtype=np.int64)
    for row, (query, candidates) in enumerate(zip(queries, order)):
        taken = {int(cluster[query])}
        picked = []
        for c in candidates:
            if int(cluster[c]) not in taken:
                taken.add(int(cluster[c]))
                picked.append(int(c))
                if len(picked) == NUM_NEGATIVES:
                    break
        negatives[row] = picked
    return negatives


def train(net, images, split, mining: str, steps: int, batch_tuples: int, mine_every: int, lr: float,
          seed: int) -> dict[str, float]:
    """`steps` Adam steps of `batch_tuples` tuples (anchor, positive, NUM_NEGATIVES negatives)."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-6)
    net.train()
    wall, cpu, losses = time.monotonic(), time.process_time(), []
    for step in range(steps):
        if step % mine_every == 0:  # a new "epoch": fresh pairs and negatives
            pairs = rng.choice(len(split.qidxs), size=min(len(split.qidxs), mine_every * batch_tuples),
                               replace=False)
            queries, positives = split.qidxs[pairs], split.pidxs[pairs]
            negatives = choose_negatives(rng, queries, split.cluster, mining, net, images)
        at = (step % mine_every) * batch_tuples % len(queries)
        sl = slice(at, at + batch_tuples)
        tuples = np.concatenate([queries[sl, None], positives[sl, None], negatives[sl]], axis=1)  # (B, 7)
        vectors = forward_images(net, images, tuples.ravel().tolist()).view(len(tuples), tuples.shape[1], -1)
        loss = contrastive_loss(vectors[:, 0], vectors[:, 1:2], vectors[:, 2:], margin=0.7).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log.info("%s step %d loss %.4f", mining, step + 1, float(np.mean(losses[-50:])))
    net.eval()
    # CPU seconds (all threads) do not depend on what else runs on the machine; wall seconds do.
    return {"steps": steps, "tuples": steps * batch_tuples,
            "first_loss": round(float(np.mean(losses[:20])), 4),
            "final_loss": round(float(np.mean(losses[-50:])), 4),
            "train_wall_s": round(time.monotonic() - wall, 1),
            "train_cpu_s": round(time.process_time() - cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="synthetic data root (generated if needed)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=128, help="max side of training images")
    parser.add_argument("--test-size", type=int, default=256, help="max side of test images")
    parser.add_argument("--steps", type=int, default=600, help="training steps per mining mode")
    parser.add_argument("--mining", nargs="+", default=["hard", "random"], choices=["hard", "random"])
    parser.add_argument("--batch-tuples", type=int, default=8)
    parser.add_argument("--mine-every", type=int, default=100, help="steps between negative mining")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/synth_learnability.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    generate(args.root, args.preset, args.seed)
    results = {"command_args": {k: str(v) for k, v in vars(args).items()},
               "thumbnail_8x8": test_scores(lambda r: thumbnail_descriptors(r, args.test_size), args.root)}
    log.info("thumbnail baseline: %s", results["thumbnail_8x8"])
    records = formats.list_images(args.root, TRAIN_NAME)["train"]
    split = formats.read_sfm_db(layout.train_db_path(args.root, TRAIN_NAME))["train"]
    images = load_training_images(records, args.train_size)
    for mining in args.mining:
        torch.manual_seed(args.seed)  # the same untrained network for every mode
        net = create_net("small_cnn", pooling="gem", pretrained=False)
        if "untrained" not in results:
            results["untrained"] = test_scores(network_descriptors(net, args.test_size), args.root)
            log.info("untrained small_cnn: %s", results["untrained"])
        info = train(net, images, split, mining, args.steps, args.batch_tuples, args.mine_every, args.lr,
                     args.seed)
        results[f"trained_{mining}"] = {**test_scores(network_descriptors(net, args.test_size), args.root),
                                        **info}
        log.info("trained (%s negatives): %s", mining, results[f"trained_{mining}"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
