"""Parameters and FLOPs of retrieval networks, and the paper's Table 1 for comparison.

Counting convention (worked out from Table 1, see docs/NETWORKS.md): FLOPs = 2 x multiply-accumulates
of convolutions and linear layers, plus one FLOP per output element of element-wise layers (activations,
residual adds, squeeze-excitation products, pooling) and two per element of BatchNorm (scale and shift).
The network is built on the `meta` device, so no weights are allocated or downloaded and the count of
even VGG16 at 362 x 362 takes a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from amldist.errors import UserError
from amldist.nets import create_net

_aten = torch.ops.aten


def _per_output(flops_per_element: int):
    def count(*args, out_shape=None, **kwargs) -> int:
        shape = out_shape[0] if isinstance(out_shape, (tuple, list)) \
            and isinstance(out_shape[0], (tuple, list)) else out_shape
        return flops_per_element * math.prod(shape)
    return count


def _per_input(x_shape, *args, out_shape=None, **kwargs) -> int:
    return math.prod(x_shape)


# Element-wise and pooling ops counted on top of FlopCounterMode's convolutions and matmuls.
_ELEMENTWISE_FLOPS = {
    **{op: _per_output(2) for op in (_aten.native_batch_norm, _aten._native_batch_norm_legit_no_training,
                                     _aten._native_batch_norm_legit)},
    **{op: _per_output(1) for op in (_aten.relu, _aten.relu_, _aten.hardtanh, _aten.hardtanh_, _aten.silu,
                                     _aten.silu_, _aten.sigmoid, _aten.add, _aten.add_, _aten.mul)},
    _aten.max_pool2d_with_indices: _per_input,
    _aten.mean: _per_input,
}


@dataclass(frozen=True)
class Complexity:
    params: int
    flops: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def complexity(architecture: str, projection_dim: int | None = None, image_size: int = 362,
               pooling: str = "gem", elementwise: bool = True) -> Complexity:
    """Parameters and FLOPs of one forward of a (image_size x image_size) image; FLOPs of the backbone
    and projection (pooling and L2N add well under 0.01%). `elementwise=False` counts only
    convolutions and matmuls."""
    with torch.device("meta"):
        net = create_net(architecture, pooling=pooling, projection_dim=projection_dim,
                         pretrained=False).eval()
    image = torch.empty(1, 3, image_size, image_size, device="meta")
    with (FlopCounterMode(display=False, custom_mapping=_ELEMENTWISE_FLOPS if elementwise else None)
          as counter, torch.no_grad()):
        try:
            net.features(image)
        except RuntimeError as err:  # pooling shrank the feature map to nothing (VGG16 needs >= 16 px)
            if "too small" not in str(err):
                raise
            raise UserError(f"image size {image_size} is too small for {architecture}: its feature map "
                            f"shrinks to nothing; use a larger --image-size") from None
    return Complexity(params=sum(p.numel() for p in net.parameters()), flops=counter.get_total_flops())


@dataclass(frozen=True)
class Table1Row:
    label: str
    architecture: str
    projection_dim: int | None
    paper_gflops: float
    paper_params_m: float


# Table 1 of the paper: GFLOPs at 362 x 362 and parameters (millions).
TABLE1 = (
    Table1Row("VGG16", "vgg16", None, 79.40, 14.71),
    Table1Row("ResNet101", "resnet101", None, 42.85, 42.50),
    Table1Row("MobileNetV2", "mobilenet_v2", None, 1.74, 2.22),
    Table1Row("MobileNetV2 ->512", "mobilenet_v2", 512, 1.94, 2.88),
    Table1Row("MobileNetV2 ->2048", "mobilenet_v2", 2048, 2.50, 4.85),
    Table1Row("EfficientNet-B3", "efficientnet_b3", None, 5.36, 10.70),
    Table1Row("EfficientNet-B3 ->512", "efficientnet_b3", 512, 5.56, 11.48),
    Table1Row("EfficientNet-B3 ->2048", "efficientnet_b3", 2048, 6.26, 13.84),
)
TABLE1_IMAGE_SIZE = 362


def percent_diff(ours: float, paper: float) -> float:
    return 100.0 * (ours - paper) / paper


def table1(image_size: int = TABLE1_IMAGE_SIZE,
           elementwise: bool = True) -> list[tuple[Table1Row, Complexity]]:
    return [(row, complexity(row.architecture, row.projection_dim, image_size, elementwise=elementwise))
            for row in TABLE1]


def format_table1(results: list[tuple[Table1Row, Complexity]]) -> str:
    header = (f"{'network':<24}{'GFLOPs':>9}{'paper':>9}{'diff %':>8}"
              f"{'params M':>11}{'paper':>9}{'diff %':>8}")
    lines = [header, "-" * len(header)]
    for row, ours in results:
        lines.append(f"{row.label:<24}{ours.gflops:>9.2f}{row.paper_gflops:>9.2f}"
                     f"{percent_diff(ours.gflops, row.paper_gflops):>+8.1f}{ours.params_m:>11.2f}"
                     f"{row.paper_params_m:>9.2f}{percent_diff(ours.params_m, row.paper_params_m):>+8.1f}")
    return "\n".join(lines)
