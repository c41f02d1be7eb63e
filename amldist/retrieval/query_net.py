"""The network that embeds queries: a checkpoint (run by `extract.embed`) or an exported file.

    query = load_query_network("student.onnx")      # or a .pt TorchScript export, or a checkpoint
    vector = query.embed(pil_image, bbx)            # (D,) float32

All three say what they are the same way (`dim`, the `teacher` they were trained against, the whitening
they bake in), so the search can refuse a query network that does not belong to an index. An exported
file is a program: load only files you trust, as with any model file that is not plain weights.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from amldist.checkpoints import load_checkpoint
from amldist.errors import UserError
from amldist.extract import Box, embed
from amldist.nets.meta import TEACHER_KEY
from amldist.retrieval.export import FORMAT, METADATA_NAME
from amldist.whiten import Whitening, apply_whitening

KINDS = ("checkpoint", "torchscript", "onnx")


class PictureSource:
    """In-memory RGB images (uploads, decoded query files) as an `extract.ImageSource`."""

    def __init__(self, images: Sequence[Image.Image], bbxs: Sequence[Box | None] | None = None):
        self.images = list(images)
        self.bbxs = list(bbxs) if bbxs is not None else [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def size(self, i: int) -> tuple[int, int]:
        return self.images[i].size

    def original_size(self, i: int) -> tuple[int, int]:
        return self.images[i].size

    def bbx(self, i: int) -> Box | None:
        return self.bbxs[i]

    def load(self, i: int) -> Image.Image:
        return self.images[i].copy()


@dataclass
class QueryNetwork:
    """What every query network tells the search, and `embed`."""

    path: Path
    kind: str                                   # checkpoint, torchscript or onnx
    dim: int                                    # descriptor dimension
    architecture: str
    teacher: dict[str, Any] | None              # meta['teacher']: the space the student was trained in
    baked_whitening: str | None = None          # whitening_digest of a whitening applied inside, if any
    image_size: int | None = None               # exported: baked in; a checkpoint takes the index's
    scales: tuple[float, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def embed(self, image: Image.Image, bbx: Box | None = None) -> np.ndarray:
        raise NotImplementedError


@dataclass
class CheckpointQuery(QueryNetwork):
    net: Any = None
    whitening: Whitening | None = None          # the index's, applied after the network

    def configure(self, image_size: int, scales: Sequence[float], whitening: Whitening | None) -> None:
        """A checkpoint embeds queries as the index embedded its gallery (evaluation's protocol)."""
        self.image_size, self.scales, self.whitening = int(image_size), tuple(scales), whitening

    def embed(self, image: Image.Image, bbx: Box | None = None) -> np.ndarray:
        if self.image_size is None or self.scales is None:
            raise ValueError("configure() the checkpoint's image size and scales first")
        vector = embed(self.net, PictureSource([image.convert("RGB")], [bbx]), image_size=self.image_size,
                       scales=self.scales, batch_size=1)
        return (apply_whitening(vector, self.whitening) if self.whitening is not None else vector)[0]


def _image_and_box(image: Image.Image, bbx: Box | None) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), writable (torch wants that)
    box = (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0])) if bbx is None else bbx
    return pixels, np.asarray(box, dtype=np.float32)


@dataclass
class TorchScriptQuery(QueryNetwork):
    module: Any = None

    def embed(self, image: Image.Image, bbx: Box | None = None) -> np.ndarray:
        pixels, box = _image_and_box(image, bbx)
        with torch.no_grad():
            return self.module(torch.from_numpy(pixels), torch.from_numpy(box)).numpy()


@dataclass
class OnnxQuery(QueryNetwork):
    session: Any = None

    def embed(self, image: Image.Image, bbx: Box | None = None) -> np.ndarray:
        pixels, box = _image_and_box(image, bbx)
        return self.session.run(None, {"image": pixels, "box": box})[0]


def file_kind(path: Path) -> str:
    """checkpoint, torchscript or onnx, from the file's content (an ONNX file is a protobuf, not a zip)."""
    if not path.is_file():
        raise UserError(f"no such query network file: {path}")
    if not zipfile.is_zipfile(path):
        return "onnx" if path.suffix.lower() == ".onnx" else "checkpoint"  # legacy torch files are not zips
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith(f"/extra/{METADATA_NAME}") for name in names):
        return "torchscript"
    if any("/code/" in name for name in names):
        raise UserError(f"{path} is a TorchScript file not written by `amldist export`")
    return "checkpoint"


def load_query_network(path: str | Path, kind: str | None = None) -> QueryNetwork:
    """The query network stored at `path`; `kind` overrides the detection (a file being written)."""
    path = Path(path)
    kind = kind or file_kind(path)
    if kind == "checkpoint":
        net, _ = load_checkpoint(path)
        meta = net.meta
        return CheckpointQuery(path, kind, int(meta.outputdim), meta.architecture,
                               meta.extra.get(TEACHER_KEY), net=net.eval())
    if kind == "torchscript":
        extra = {METADATA_NAME: ""}
        try:
            with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; it loads and runs
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as err:
            reason = str(err).splitlines()[0][:200]
            raise UserError(f"{path}: not a readable TorchScript file ({reason})") from None
        return TorchScriptQuery(**_described(path, kind, extra[METADATA_NAME]), module=module.eval())
    if kind == "onnx":
        return _load_onnx(path)
    raise ValueError(f"unknown query network kind {kind!r}")


def _load_onnx(path: Path) -> OnnxQuery:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX files need onnxruntime (pip install onnxruntime)") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- onnxruntime's errors derive from Exception only
        raise UserError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0][:200]})") from None
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_NAME, "")
    return OnnxQuery(**_described(path, "onnx", text), session=session)


def _described(path: Path, kind: str, text: str | bytes) -> dict[str, Any]:
    """The common fields of an exported file, from its metadata (written by `export_query_network`)."""
    try:
        metadata = json.loads(text) if text else None
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"{path} carries no amldist export metadata; export it with `amldist export`")
    whitening = metadata.get("whitening")
    return {"path": path, "kind": kind, "dim": int(metadata["dim"]),
            "architecture": str(metadata["architecture"]), "teacher": metadata.get("teacher"),
            "baked_whitening": whitening.get("sha256") if whitening else None,
            "image_size": int(metadata["image_size"]), "scales": tuple(metadata["scales"]),
            "details": metadata}
