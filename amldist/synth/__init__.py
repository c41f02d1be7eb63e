"""Procedural landmark generator writing SfM-120k, rOxford/rParis and R1M-style datasets.

`generate(root, preset_name, seed)` writes a synthetic data root in the real layout (see
docs/DATA.md, "Synthetic landmarks").
"""

from amldist.synth.presets import PRESETS, PUBLIC_PRESETS, Preset, get_preset
from amldist.synth.writer import GENERATOR_VERSION, generate

__all__ = ["GENERATOR_VERSION", "PRESETS", "PUBLIC_PRESETS", "Preset", "generate", "get_preset"]
