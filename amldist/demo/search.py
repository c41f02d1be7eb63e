"""The demo's asymmetric search (`amldist demo --search`, `make search-demo`): the users' side of the paper.

After the demo's stages (reused when done), with the same library functions the commands call:
1. `amldist export`: each asymmetric student to ONNX (checked against its checkpoint on gallery images);
2. `amldist index`: each test set's database, embedded by the teacher (flat index);
3. `amldist search`: every test query (cropped to its box) against the teacher's index, with the exported
   students, with the student trained alone (which the search refuses unless told to skip the teacher
   check: it records no teacher) and with the teacher itself (symmetric, the ceiling);
4. a report: the share of queries whose top 10 holds a positive of the query's landmark (easy or hard,
   the medium protocol), against what a random ranking gives, a contact sheet of one query, the refusal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amldist.atomic import atomic_write_json, atomic_write_text
from amldist.datasets import formats, layout
from amldist.demo.settings import TEACHER_RUN, TEST_DATASETS, DemoSettings
from amldist.errors import UserError, require
from amldist.extract import FileSource

TOP_K = 10
SEARCH_DIR = "search"
ASYM_KEYS = ("contrplus", "reg")        # the demo's students trained in the teacher's space
BASELINE_KEY = "baseline"
SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class SearchRow:
    label: str
    network: str
    hit_rates: dict[str, float]         # dataset -> share of queries with a positive in the top 10


def _best(settings: DemoSettings, key: str) -> Path:
    from amldist.training.state import BEST_FILE

    run = settings.teacher_run if key == TEACHER_RUN.key else next(r for r in settings.student_runs
                                                                   if r.key == key)
    path = settings.run_dir(run) / BEST_FILE
    require(path.is_file(), f"{path} is missing: run `amldist demo --preset {settings.name}` first")
    return path


def chance_hit_rate(truth: formats.GroundTruth, k: int = TOP_K) -> float:
    """Expected share of queries with a positive in the top k of a uniformly random ranking."""
    total = len(truth.imlist)
    rates = []
    for entry in truth.gnd:
        positives = len(entry["easy"]) + len(entry["hard"])
        rates.append(1.0 - math.comb(total - positives, k) / math.comb(total, k))
    return float(np.mean(rates))


def _positives(truth: formats.GroundTruth, query: int) -> set[str]:
    entry = truth.gnd[query]
    return {truth.imlist[int(i)] for i in list(entry["easy"]) + list(entry["hard"])}


def hit_rate(searcher, truth: formats.GroundTruth, queries: FileSource, k: int = TOP_K) -> float:
    """Share of the test queries (cropped to their boxes) with a positive among their top k."""
    found = []
    for q in range(len(queries)):
        hits = searcher.search(queries.load(q), queries.bbx(q), k)
        found.append(bool(_positives(truth, q) & {h.name for h in hits}))
    return float(np.mean(found))


def _export_students(settings: DemoSettings, out: Path, check_images: list[Path], echo) -> dict[str, Path]:
    from amldist.retrieval.export import export_query_network
    from amldist.retrieval.query_net import load_query_network

    exported = {}
    for key in ASYM_KEYS:
        checkpoint = _best(settings, key)
        require(load_query_network(checkpoint).teacher is not None,
                f"{checkpoint} records no teacher (trained before students recorded theirs); retrain the "
                f"students with `amldist demo --preset {settings.name} --force students`")
        report = export_query_network(checkpoint, out / f"{key}.onnx", "onnx", check_images=check_images)
        echo(f"  export {key}: {report.path} -- {report.check.line('onnx')}")
        exported[key] = report.path
    return exported


def _index(settings: DemoSettings, dataset: str, teacher: Path, out: Path, echo):
    from amldist.feature_store import file_sha256
    from amldist.retrieval.gallery import shard_gallery
    from amldist.retrieval.index import MANIFEST, GalleryIndex, IndexSettings, build_index

    folder = out / f"index-{dataset}"
    shards = layout.shards_dir(settings.data_root, dataset, settings.test_image_size) / "db"
    if (folder / MANIFEST).is_file():
        index = GalleryIndex.open(folder)
        if index.manifest["network_sha256"] == file_sha256(teacher):
            return index
    report = build_index(teacher, shard_gallery(shards), folder,
                         IndexSettings(image_size=settings.test_image_size, workers=0), replace=True)
    echo(f"  index {dataset}: {report.lines()[0]}")
    return GalleryIndex.open(folder)


def run_search_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> list[SearchRow]:
    """Export, index, search and report (see the module docstring); returns the table's rows."""
    from amldist.retrieval.query import AsymmetricSearch
    from amldist.retrieval.query_net import load_query_network

    out = settings.report_dir / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    teacher = _best(settings, TEACHER_RUN.key)
    records = {name: formats.list_images(settings.data_root, name) for name in TEST_DATASETS}
    truths = {name: formats.read_gnd(layout.gnd_path(settings.data_root, name)) for name in TEST_DATASETS}
    check_images = [r.path for r in records[TEST_DATASETS[0]]["db"][:8]]
    exported = _export_students(settings, out, check_images, echo)
    networks = [(f"{key} student, exported ONNX", exported[key], False) for key in ASYM_KEYS]
    networks += [("student trained alone (teacher check skipped)", _best(settings, BASELINE_KEY), True),
                 ("teacher itself (symmetric)", teacher, False)]
    rows, refusal = [], ""
    indexes = {name: _index(settings, name, teacher, out, echo) for name in TEST_DATASETS}
    for label, network, skip in networks:
        rates = {}
        for name in TEST_DATASETS:
            searcher = AsymmetricSearch(indexes[name], load_query_network(network), skip_teacher_check=skip)
            rates[name] = hit_rate(searcher, truths[name], FileSource.from_records(records[name]["query"]))
        rows.append(SearchRow(label, str(network), rates))
        echo(f"  {label}: " + ", ".join(f"{name} {100 * rate:.0f}%" for name, rate in rates.items()))
    try:
        AsymmetricSearch(indexes[TEST_DATASETS[0]], load_query_network(_best(settings, BASELINE_KEY)))
    except UserError as err:
        refusal = str(err)
    chance = {name: chance_hit_rate(truth) for name, truth in truths.items()}
    _sheet(indexes[TEST_DATASETS[0]], exported[ASYM_KEYS[0]], truths[TEST_DATASETS[0]],
           records[TEST_DATASETS[0]]["query"], out / SHEET)
    _write(out, rows, chance, refusal, settings)
    echo(f"search report: {out / 'search.md'}")
    return rows


def _sheet(index, network: Path, truth: formats.GroundTruth, queries: list, path: Path) -> None:
    from amldist.retrieval.query import AsymmetricSearch, contact_sheet
    from amldist.retrieval.query_net import load_query_network

    source = FileSource.from_records(queries)
    image, bbx = source.load(0), source.bbx(0)
    hits = AsymmetricSearch(index, load_query_network(network)).search(image, bbx, TOP_K)
    entry = truth.gnd[0]
    junk = {truth.imlist[int(i)] for i in entry.get("junk", [])}
    marks = [None if h.name in junk else h.name in _positives(truth, 0) for h in hits]
    gallery = index.gallery()
    contact_sheet(image, bbx, hits, [gallery.load(h.row) for h in hits], path, marks=marks,
                  title=f"query {truth.qimlist[0]} (box) by {network.name}; teacher index of "
                        f"{len(index)} images")


def _write(out: Path, rows: list[SearchRow], chance: dict[str, float], refusal: str,
           settings: DemoSettings) -> None:
    names = list(TEST_DATASETS)
    lines = [f"# Asymmetric search on the {settings.name} demo", "",
             (f"Queries: every test query, cropped to its box, at {settings.test_image_size} px; gallery: "
              f"the test set's database, indexed by the teacher (flat). A query counts when its top {TOP_K} "
              f"holds an image of its landmark (easy or hard)."), "",
             "| query network | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        lines.append(f"| {row.label} | " + " | ".join(f"{100 * row.hit_rates[n]:.1f} %" for n in names)
                     + " |")
    lines.append("| random ranking (expected) | " + " | ".join(f"{100 * chance[n]:.1f} %" for n in names)
                 + " |")
    lines += ["", f"Without --skip-teacher-check the student trained alone is refused: `{refusal}`", "",
              f"![contact sheet]({SHEET})", "",
              "Green frames: the query's landmark; red: another; none: junk (neither)."]
    atomic_write_text(out / "search.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "search.json", {"top_k": TOP_K, "datasets": names, "random_ranking": chance,
                                            "refusal": refusal, "rows": [vars(r) for r in rows]})
