"""How far a padded batch's descriptors are from the same images embedded one at a time.

    python scripts/padding_deviation.py --out docs/measurements/MACHINE/padding-deviation.txt

Uses the images, seeds and BatchNorm statistics of tests/test_nets.py's
`test_padded_batches_match_one_at_a_time` (imported from that file, so the two cannot drift apart):
7 random images of 41-64 x 64-80 pixels in one batch (up to 45% padding), eval mode. Prints, per
architecture, max |batched - one at a time| over the descriptor entries with `valid_hw` (what
amldist does) and without it (the padding leaks into the pooling and the convolutions near the
border). The test asserts the bounds; this script writes the measured values (docs/NETWORKS.md).
No weights are downloaded (pretrained=False).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from amldist.atomic import atomic_write_text
from amldist.batching import pad_batch
from amldist.nets import create_net
from amldist.training.optim import calibrate_batchnorm

TEST_FILE = Path(__file__).resolve().parent.parent / "tests" / "test_nets.py"
ARCHITECTURES = ["small_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0", "efficientnet_b3"]


def _test_module():
    spec = importlib.util.spec_from_file_location("amldist_test_nets", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deviations(architecture: str, test_nets) -> tuple[float, float]:
    """(max deviation with valid_hw, without it) for one architecture, set up as the test does."""
    torch.manual_seed(0)
    net = create_net(architecture, pretrained=False).eval()
    images = [torch.randn(3, h, w) for h, w in test_nets.SIZES]
    if architecture in ("small_cnn", "resnet18"):
        test_nets._randomise_batchnorm(net)
    else:  # as in the test: from scratch these ignore the input until BatchNorm fits the data
        calibrate_batchnorm(net, iter(images))
        net.eval()
    with torch.no_grad():
        single = torch.cat([net(image[None]) for image in images])
        batch, valid_hw = pad_batch(images)
        masked = (net(batch, valid_hw) - single).abs().max().item()
        unmasked = (net(batch) - single).abs().max().item()
    return masked, unmasked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    test_nets = _test_module()
    lines = [f"images (h, w): {test_nets.SIZES}; eval mode; float32 on the CPU",
             f"{'network':<20}{'with valid_hw':>16}{'without':>12}"]
    for architecture in ARCHITECTURES:
        masked, unmasked = deviations(architecture, test_nets)
        lines.append(f"{architecture:<20}{masked:>16.1e}{unmasked:>12.2g}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
