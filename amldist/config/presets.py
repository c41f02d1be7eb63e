"""Named YAML presets (the repository's presets/ folder) and YAML config files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from amldist.errors import UserError

PRESETS_ENV = "AMLDIST_PRESETS_DIR"
PRESET_SUFFIX = ".yaml"
TUNE_SECTION = "tune"


def presets_dir() -> Path:
    """presets/ beside the package (an editable install or a checkout), or $AMLDIST_PRESETS_DIR."""
    override = os.environ.get(PRESETS_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    folder = presets_dir()
    return sorted(path.stem for path in folder.glob(f"*{PRESET_SUFFIX}")) if folder.is_dir() else []


def preset_path(name_or_path: str) -> Path:
    """A preset name (`mnv2-vgg16-contrplus-asym`) or the path of a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise UserError(f"--preset: no such file: {name_or_path}")
        return path
    candidate = presets_dir() / f"{name_or_path}{PRESET_SUFFIX}"
    if not candidate.is_file():
        count = len(list_presets())
        hint = (f"; presets/README.md lists the {count} presets" if count
                else f" (no presets under {presets_dir()})")
        raise UserError(f"--preset: unknown preset {name_or_path!r}{hint}")
    return candidate


def preset_dict(name_or_path: str) -> dict[str, Any]:
    """The raw (unresolved) nested dict of a preset; run.name defaults to the preset's file name. A `tune:`
    section (a hyper-parameter search's settings, `amldist.tuning`) is not part of the run's config."""
    return preset_sections(name_or_path)[0]


def preset_sections(name_or_path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the raw config dict, the `tune:` section or None) of a preset name or YAML file."""
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"--preset: {path} is not valid YAML ({err.__class__.__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"--preset: {path} is not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--preset: {path} must hold a mapping of sections")
    tune = data.pop(TUNE_SECTION, None)
    run = data.setdefault("run", {}) or {}
    if isinstance(run, dict) and run.get("name") is None:
        run["name"] = path.stem
        data["run"] = run
    return data, tune
