"""Contact sheet of synthetic landmarks: one row per landmark, one column per view kind.

    .venv/bin/python scripts/synth_contact_sheet.py --out docs/img/synth_examples.png

Rows show one landmark of each style, and the last two rows are look-alikes (one family).
Columns: a query (the yellow box is its gnd bbx), easy views, hard views and junk views, each
labelled with how the camera realised it. Uses the generator's own functions, so the sheet shows
exactly what `amldist data synth` writes (at --image-size).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw

from amldist.synth.camera import box_in_image, sample_view
from amldist.synth.params import STYLES, LandmarkSpec
from amldist.synth.photo import photograph
from amldist.synth.render import render_scene
from amldist.synth.scenes import make_landmark

COLUMNS = ("query", "easy", "easy", "hard", "hard", "hard", "junk", "junk")
LABEL_HEIGHT = 14


def pick_landmarks(seed: int) -> list[LandmarkSpec]:
    """The first landmark of every style, then two members of one family."""
    chosen: dict[str, LandmarkSpec] = {}
    for landmark_id in range(200):
        spec = LandmarkSpec(landmark_id, landmark_id, "train")
        chosen.setdefault(make_landmark(seed, spec).style, spec)
        if len(chosen) == len(STYLES):
            break
    family = [LandmarkSpec(1000 + k, 1000, "roxford5k") for k in range(2)]
    return [chosen[s] for s in STYLES if s in chosen] + family


def tile(seed: int, spec: LandmarkSpec, view_id: int, kind: str, image_size: int, thumb: int,
         scene: Image.Image) -> Image.Image:
    landmark = make_landmark(seed, spec)
    box = landmark.box()
    view = sample_view(seed, spec.landmark_id, view_id, kind, box, image_size)
    image = Image.open(io.BytesIO(
        photograph(seed, scene, view, box, spec.landmark_id, view_id))).convert("RGB")
    if kind == "query":
        bbx, _ = box_in_image(view, box)
        ImageDraw.Draw(image).rectangle(bbx, outline=(255, 220, 0), width=max(2, image_size // 128))
    image.thumbnail((thumb, thumb))
    cell = Image.new("RGB", (thumb, thumb + LABEL_HEIGHT), (255, 255, 255))
    cell.paste(image, ((thumb - image.width) // 2, (thumb - image.height) // 2))
    ImageDraw.Draw(cell).text((3, thumb + 1), f"{kind}: {view.mode}", fill=(0, 0, 0))
    return cell


def contact_sheet(seed: int, image_size: int, thumb: int) -> Image.Image:
    specs = pick_landmarks(seed)
    pad = 4
    sheet = Image.new("RGB", (len(COLUMNS) * (thumb + pad), len(specs) * (thumb + LABEL_HEIGHT + pad)),
                      (255, 255, 255))
    for row, spec in enumerate(specs):
        scene = render_scene(seed, make_landmark(seed, spec), image_size)
        for col, kind in enumerate(COLUMNS):
            cell = tile(seed, spec, col, kind, image_size, thumb, scene)
            sheet.paste(cell, (col * (thumb + pad), row * (thumb + LABEL_HEIGHT + pad)))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/synth_examples.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=512, help="max side of the rendered views")
    parser.add_argument("--thumb", type=int, default=140, help="max side of each tile on the sheet")
    args = parser.parse_args()
    sheet = contact_sheet(args.seed, args.image_size, args.thumb)
    # A 256-colour palette keeps the PNG small enough to live in the repository.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
