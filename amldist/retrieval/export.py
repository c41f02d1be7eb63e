"""A student as one file a client runs on an image: TorchScript or ONNX, preprocessing included.

    report = export_query_network("model_best.pth.tar", "student.onnx", "onnx", check_images=paths)

The exported graph takes the decoded image, uint8 (H, W, 3) RGB, and a box (4,) float32 x1, y1, x2, y2
in its pixels ((0, 0, W, H) for the whole image, the database rule), and returns the descriptor (D,)
float32: the query cropped and shrunk exactly as `extract.prepare_image` (PIL's Lanczos thumbnail,
reproduced by `preprocess`), normalised with the network's mean/std, the network (pooling, FC whitening),
the multi-scale combination of `extract.embed`, then learned whitening when one is baked in.

Both formats come from one trace (`torch.jit.trace`; ONNX through torch's TorchScript-based exporter,
which keeps the shape computations as graph operations, where the newer torch.export-based one cannot
follow sizes that depend on the image). Before the file is kept, its runtime (TorchScript, or ONNX
Runtime) embeds real images and every descriptor must match the checkpoint's own (`extract.embed`
+ `whiten.apply_whitening`) within `TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amldist.atomic import atomic_path
from amldist.checkpoints import load_checkpoint
from amldist.errors import require
from amldist.extract import FileSource, combine_scales, embed, multiscale_power
from amldist.feature_store import file_sha256
from amldist.nets.meta import TEACHER_KEY
from amldist.retrieval import preprocess
from amldist.whiten import NORM_EPS, Whitening, apply_whitening

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FORMAT = "amldist-query-network"
VERSION = 1
METADATA_NAME = "amldist.json"  # the TorchScript extra file and the ONNX metadata key holding `metadata`
TOLERANCE = 1e-5                # max |exported - checkpoint| over descriptor entries (unit vectors)
CHECK_IMAGES = 8                # real images the export is checked on (each whole and as a cropped query)
ONNX_OPSET = 17


def whitening_digest(whitening: Whitening) -> str:
    """sha256 of a whitening's m and P (float64): which whitening an index or an export applies."""
    digest = hashlib.sha256()
    for array in (whitening.m, whitening.P):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


class QueryEncoder(nn.Module):
    """image uint8 (H, W, 3), box float32 (4,) -> descriptor (D,) float32; see the module docstring."""

    def __init__(self, net: nn.Module, image_size: int, scales: Sequence[float], whitening: Whitening | None):
        super().__init__()
        self.net = net.eval()
        self.image_size = float(image_size)
        self.scales = [float(s) for s in scales]
        self.power = multiscale_power(net, self.scales)
        self.register_buffer("mean", torch.tensor(net.meta.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(net.meta.std, dtype=torch.float32))
        self.whitened = whitening is not None
        if whitening is not None:
            self.register_buffer("lw_m", torch.from_numpy(np.asarray(whitening.m, np.float64)))
            self.register_buffer("lw_P", torch.from_numpy(np.asarray(whitening.P, np.float64)))

    def forward(self, image: Tensor, box: Tensor) -> Tensor:
        pixels = preprocess.prepare(image, box, self.image_size)  # (h, w, 3) float64, 8-bit values
        x = ((pixels.float() / 255.0 - self.mean) / self.std).permute(2, 0, 1)[None]  # (1, 3, h, w)
        per_scale = [self.net(x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                               align_corners=False)) for s in self.scales]
        v = combine_scales(per_scale, self.power)  # (1, D)
        if self.whitened:
            w = (v.double() - self.lw_m) @ self.lw_P.t()
            v = (w / (torch.linalg.vector_norm(w, dim=1, keepdim=True) + NORM_EPS)).float()
        return v[0]


@dataclass(frozen=True)
class ExportCheck:
    images: int                 # real images, each embedded whole and as a cropped query
    max_abs_diff: float         # max |exported - checkpoint| over all descriptor entries
    min_cosine: float
    seconds_per_image: float    # the exported file's runtime, this machine
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self, runtime: str) -> str:
        verdict = "within" if self.passed else "NOT within"
        return (f"check: {runtime} on {self.images} images x (whole, cropped query): "
                f"max |exported - checkpoint| = {self.max_abs_diff:.2e}, min cosine {self.min_cosine:.7f}, "
                f"{verdict} the tolerance "
                f"{self.tolerance:.0e}; {1000 * self.seconds_per_image:.0f} ms per image")


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    metadata: dict[str, Any]
    check: ExportCheck


def trained_image_size(info: dict[str, Any]) -> int | None:
    """The longest image side the checkpoint was trained at (its config's data.image_size), if recorded."""
    config = info.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("image_size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def export_query_network(network: str | Path, out: str | Path, fmt: str, *, check_images: Sequence[Path],
                         image_size: int | None = None, scales: Sequence[float] = (1.0,),
                         whitening: Whitening | None = None,
                         whitening_source: str | None = None) -> ExportReport:
    """Write the student at `network` as a `fmt` file at `out`, checked on `check_images` before it is
    kept."""
    require(fmt in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require(len(check_images) > 0, "the export check needs at least one real image")
    net, info = load_checkpoint(network)
    net = net.eval()
    size = image_size or trained_image_size(info)
    require(size is not None, f"{network} records no training image size; give --image-size")
    if whitening is not None:
        require(whitening.P.shape[1] == net.meta.outputdim,
                f"the whitening expects {whitening.P.shape[1]}-D descriptors, the network gives "
                f"{net.meta.outputdim}")
    encoder = QueryEncoder(net, size, scales, whitening)
    metadata = _metadata(Path(network), net, size, scales, whitening, whitening_source)
    out = Path(out)
    with atomic_path(out) as tmp:
        _write(encoder, tmp, fmt, metadata, size)
        check = check_export(tmp, fmt, net, size, scales, whitening, check_images)
        require(check.passed, f"the exported network does not reproduce the checkpoint: {check.line(fmt)}")
        metadata["check"] = {"images": check.images, "max_abs_diff": check.max_abs_diff,
                             "min_cosine": check.min_cosine, "tolerance": check.tolerance}
        _write_metadata(tmp, fmt, metadata)
    return ExportReport(out, fmt, metadata, check)


def _metadata(network: Path, net, image_size: int, scales: Sequence[float], whitening: Whitening | None,
              whitening_source: str | None) -> dict[str, Any]:
    lw = None if whitening is None else {"sha256": whitening_digest(whitening), "source": whitening_source,
                                         "dim": whitening.dim}
    return {"format": FORMAT, "version": VERSION, "architecture": net.meta.architecture,
            "dim": whitening.dim if whitening is not None else int(net.meta.outputdim),
            "image_size": int(image_size), "scales": [float(s) for s in scales], "whitening": lw,
            "teacher": net.meta.extra.get(TEACHER_KEY), "network": str(network),
            "network_sha256": file_sha256(network),
            "inputs": {"image": "uint8 (H, W, 3) RGB",
                       "box": "float32 (4,) x1 y1 x2 y2, (0, 0, W, H) = whole"}}


def _example(image_size: int) -> tuple[Tensor, Tensor]:
    """A trace input that takes every path: larger than 4x the target (box reduction), not square."""
    generator = torch.Generator().manual_seed(0)
    height, width = 4 * image_size + 3, 3 * image_size + 1
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return image, torch.tensor([0.0, 0.0, width, height])


def _write(encoder: QueryEncoder, path: Path, fmt: str, metadata: dict[str, Any], image_size: int) -> None:
    example = _example(image_size)
    with warnings.catch_warnings(), torch.no_grad():
        # The trace warns about every size it reads from a tensor; the check below is what shows the
        # graph generalises to other image sizes.
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            traced = torch.jit.trace(encoder, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={METADATA_NAME: json.dumps(metadata)})
        else:
            torch.onnx.export(encoder, example, str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image", "box"], output_names=["descriptor"],
                              dynamic_axes={"image": {0: "height", 1: "width"}})
            _write_metadata(path, fmt, metadata)


def _write_metadata(path: Path, fmt: str, metadata: dict[str, Any]) -> None:
    """Store `metadata` in the written file (TorchScript: saved again with the extra file; ONNX: in its
    metadata_props)."""
    text = json.dumps(metadata)
    if fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript is marked deprecated in torch 2.14; it still works
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
            torch.jit.save(module, str(path), _extra_files={METADATA_NAME: text})
        return
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, text
    onnx.save(model, str(path))


def check_boxes(paths: Sequence[Path]) -> list[tuple[float, float, float, float]]:
    """A query box per check image: its central half, at fractional pixels (the rounding is checked too)."""
    boxes = []
    for path in paths:
        width, height = FileSource([path]).size(0)
        boxes.append((width * 0.25 + 0.4, height * 0.25 + 0.5, width * 0.75 - 0.5, height * 0.75 + 0.6))
    return boxes


def check_export(path: Path, fmt: str, net, image_size: int, scales: Sequence[float],
                 whitening: Whitening | None, images: Sequence[Path]) -> ExportCheck:
    """Embed `images` (whole, then cropped) with the exported file's runtime and with the checkpoint."""
    from amldist.retrieval.query_net import load_query_network

    images = list(images)
    boxes: list = [None] * len(images) + check_boxes(images)
    source = FileSource(images + images, boxes)
    reference = embed(net, source, image_size=image_size, scales=scales, batch_size=1,
                      device="cpu")  # (2n, D)
    if whitening is not None:
        reference = apply_whitening(reference, whitening)
    exported = load_query_network(path, kind=fmt)
    started = time.perf_counter()
    vectors = np.stack([exported.embed(source.load(i), source.bbx(i)) for i in range(len(source))])
    seconds = (time.perf_counter() - started) / len(source)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.sum(vectors * reference, axis=1) / norms
    return ExportCheck(len(images), float(np.abs(vectors - reference).max()), float(cosine.min()), seconds)
