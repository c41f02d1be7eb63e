"""The demo: report pieces from small fake inputs, and one end-to-end smoke run on the micro synthetic set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amldist.datasets.formats import GroundTruth
from amldist.demo import embeddings, plots
from amldist.demo.pipeline import STAGES, force_set
from amldist.demo.report import Figure, ReportContent, RunSummary, StageTiming, write_report
from amldist.demo.settings import STUDENT_RUNS, TEACHER_RUN, demo_settings
from amldist.demo.stages import run_config
from amldist.demo.table import (
    SizeRow,
    TableRow,
    format_markdown,
    format_sizes,
    format_table,
    loss_label,
    parse_table,
    scores_from_eval,
)
from amldist.errors import UserError
from amldist.training.negatives_log import NEGATIVES_FILE, append_negatives, read_negatives

DATASETS = ["roxford5k", "rparis6k"]


def _scores(base: float) -> dict:
    return {d: {"medium": base + i, "hard": base / 2 + i} for i, d in enumerate(DATASETS)}


def _rows() -> list[TableRow]:
    teacher = TableRow("t", "resnet18", 512, None, True, "Contr (4)", "hard", False, {"sym": _scores(40.25)})
    student = TableRow("s", "efficientnet_b3", 2048, "resnet18", False, "Reg (7)", "none", True,
                       {"sym": _scores(30.0), "asym": _scores(12.34)})
    return [teacher, student]


# ---------------------------------------------------------------- table


def test_printed_table_reads_back_with_every_number_and_description():
    text = format_table(_rows(), DATASETS)
    labels, rows = parse_table("some log line\n" + text + "\n\nreport: runs/demo/report.md\n")
    assert labels == ["ROxf", "RPar"]
    assert [r["student"] for r in rows] == ["resnet18", "efficientnet_b3"]  # a name wider than the header
    teacher, student = rows
    assert teacher["teacher"] is None and teacher["labels"] and not teacher["asym"] \
        and teacher["mining"] == "hard"
    assert student["teacher"] == "resnet18" and not student["labels"] and student["asym"]
    assert student["mining"] == "none" and student["loss"] == "Reg (7)" and student["dim"] == 2048
    # rounded to one decimal: 40.25 -> 40.2, RPar medium = 40.25 + 1; hard = 40.25 / 2 (+1)
    assert teacher["scores"]["sym"]["ROxf"] == {"medium": 40.2, "hard": 20.1}
    assert teacher["scores"]["sym"]["RPar"] == {"medium": 41.2, "hard": 21.1}
    assert teacher["scores"]["asym"]["ROxf"] == {"medium": None, "hard": None}  # printed as a dash
    assert student["scores"]["asym"]["RPar"] == {"medium": 13.3, "hard": 7.2}


def test_table_columns_follow_the_paper_order():
    header = next(line for line in format_table(_rows(), DATASETS).splitlines() if line.startswith("STUDENT"))
    assert header.split("|")[1].split() == ["ROxf", "RPar"] * 4
    first, second = format_table(_rows(), DATASETS).splitlines()[:2]
    assert first.index("SYMMETRIC") < first.index("ASYMMETRIC")
    assert second.split() == ["MEDIUM", "HARD", "MEDIUM", "HARD"]


def test_parse_table_rejects_text_without_a_table():
    with pytest.raises(ValueError):
        parse_table("no table here")


def test_markdown_table_has_one_cell_per_column():
    lines = format_markdown(_rows(), DATASETS).splitlines()
    widths = {line.count("|") for line in lines}
    assert widths == {7 + 8 + 1}
    assert "| 12.3 |" in lines[3] and "| – |" in lines[2]


def test_scores_come_from_the_whitened_eval_results():
    results = {"asym": {"roxford5k": {"raw": {"medium": {"mAP": 1.0}, "hard": {"mAP": 2.0}},
                                      "whiten": {"medium": {"mAP": 30.5}, "hard": {"mAP": None}}}}}
    assert scores_from_eval(results, "asym") == {"roxford5k": {"medium": 30.5, "hard": None}}
    assert scores_from_eval(results, "asym", variant="raw") == {"roxford5k": {"medium": 1.0, "hard": 2.0}}
    assert scores_from_eval(results, "sym") == {}


def test_loss_labels_carry_the_papers_equation_numbers():
    assert loss_label("contrastive_plus") == "Contr+ (10)"
    assert loss_label("regression") == "Reg (7)"
    assert loss_label("contrastive") == "Contr (4)"


# ---------------------------------------------------------------- figures


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_training_curves_png_from_metrics_records(tmp_path):
    runs = {"teacher": [{"epoch": e, "loss": 1.0 / (e + 1), "val_map_sym": 10.0 + e} for e in range(4)],
            "reg": [{"epoch": e, "loss": 0.2, "val_map_sym": 5.0, "val_map_asym": float(e)}
                    for e in range(4)]}
    width, height = _png_size(plots.plot_training_curves(runs, tmp_path / "curves.png"))
    assert width > 2 * height  # three panels side by side
    with pytest.raises(ValueError):
        plots.plot_training_curves({"empty": []}, tmp_path / "none.png")


def test_negatives_grouped_by_anchor_over_epochs_and_drawn(tmp_path):
    records = [{"epoch": e, "anchors": [7, 9], "negatives": [[e, e + 1, e + 2], [20 + e, 21, 22]]}
               for e in (2, 0, 1)]
    grouped = plots.negatives_by_anchor(records)
    assert grouped[7] == [(0, [0, 1, 2]), (1, [1, 2, 3]), (2, [2, 3, 4])]
    assert [epoch for epoch, _ in grouped[9]] == [0, 1, 2]
    loaded = []

    def load(i: int) -> Image.Image:
        loaded.append(i)
        return Image.new("RGB", (40 + i, 30), (i * 10 % 255, 80, 120))

    path = plots.plot_negatives_over_epochs(records, load, tmp_path / "neg.png", max_anchors=1, max_epochs=2)
    assert _png_size(path)[1] > 0
    # one anchor, epochs 0 and 2 (first and last kept): anchor 7 and negatives 0,1,2 / 2,3,4, each loaded once
    assert sorted(loaded) == [0, 1, 2, 3, 4, 7]
    with pytest.raises(ValueError):
        plots.plot_negatives_over_epochs([{"epoch": 0, "anchors": [1], "negatives": [[]]}], load,
                                         tmp_path / "x.png")


def test_spread_keeps_first_and_last():
    assert plots._spread(list(range(10)), 3) == [0, 4, 9]
    assert plots._spread([1, 2], 5) == [1, 2]


def test_tsne_plot_needs_matching_points(tmp_path):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(12, 2))
    labels = ["a", "b", "c"] * 4
    assert _png_size(plots.plot_tsne(teacher, teacher + 0.1, labels, tmp_path / "t.png"))[0] > 0
    with pytest.raises(ValueError):
        plots.plot_tsne(teacher, teacher[:5], labels, tmp_path / "bad.png")


def test_landmarks_are_the_distinct_positive_sets_of_queries():
    gnd = [{"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([9])},
           {"easy": np.array([1, 0]), "hard": np.array([2]), "junk": np.array([])},   # same landmark again
           {"easy": np.array([3]), "hard": np.array([4, 5]), "junk": np.array([])},
           {"easy": np.array([6]), "hard": np.array([]), "junk": np.array([])}]
    truth = GroundTruth(imlist=[f"x_{i}" for i in range(10)],
                        qimlist=["rox_000056_0000", "rox_000056_0001", "rox_000059_0000", "rox_000061_0000"],
                        gnd=gnd)
    chosen = embeddings.pick_landmarks(truth, num_landmarks=2, per_landmark=2)
    assert chosen.positions.tolist() == [0, 1, 3, 4]
    assert chosen.labels == ["rox_000056", "rox_000056", "rox_000059", "rox_000059"]
    assert embeddings.landmark_name("plain") == "plain"


def test_tsne_places_both_spaces_in_one_map():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    teacher = np.repeat(centres, 6, axis=0) + rng.normal(scale=0.1, size=(18, 16))
    student = teacher + rng.normal(scale=0.01, size=teacher.shape)  # nearly the same vectors
    teacher_xy, student_xy = embeddings.tsne_pairs(teacher, student)
    assert teacher_xy.shape == student_xy.shape == (18, 2)
    pair_gap = np.linalg.norm(teacher_xy - student_xy, axis=1).mean()
    spread = np.linalg.norm(teacher_xy - teacher_xy.mean(0), axis=1).mean()
    assert pair_gap < spread / 3  # an image's two points lie together when the spaces agree


def test_eval_descriptors_are_saved_whole_under_their_own_name(tmp_path):
    from amldist.demo.evaluation import _save_descriptors

    vectors = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = tmp_path / "run.roxford5k-db.npy"
    _save_descriptors(path, vectors)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = np.load(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, vectors)


def test_random_ranking_floor_matches_the_share_of_positives():
    from amldist.demo.assemble import random_ranking_scores

    # 200 images, each query with 20 medium positives (10 easy + 10 hard) and 10 hard ones: a random
    # ranking's AP is close to the share of positives, 20/200 and 10/200 (a little above for few positives).
    gnd = [{"easy": np.arange(10 * q, 10 * q + 10), "hard": np.arange(100 + 10 * q, 110 + 10 * q),
            "junk": np.array([], np.int64)} for q in range(5)]
    truth = GroundTruth([f"i{i}" for i in range(200)], [f"q{q}" for q in range(5)], gnd)
    floor = random_ranking_scores({"roxford5k": truth}, repeats=40)["roxford5k"]
    assert 9.0 < floor["medium"] < 13.0
    assert 4.0 < floor["hard"] < 8.0


# ---------------------------------------------------------------- negatives log, report, settings


def test_negatives_log_keeps_the_last_line_of_each_epoch(tmp_path):
    append_negatives(tmp_path, 0, np.array([3, 4]), np.array([[1, 2], [5, 6]]))
    append_negatives(tmp_path, 1, np.array([3, 4]), np.array([[7, 8], [9, 1]]))
    # epoch 1 again after a resume
    append_negatives(tmp_path, 1, np.array([3, 4]), np.array([[2, 2], [2, 2]]))
    with open(tmp_path / NEGATIVES_FILE, "a") as handle:
        handle.write('{"epoch": 2, "anch')  # torn by a crash
    records = read_negatives(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["negatives"] == [[2, 2], [2, 2]] and records[0]["anchors"] == [3, 4]
    assert read_negatives(tmp_path / "missing") == []


def test_report_files_link_every_figure_and_hold_the_table(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "fig.png")
    rows = _rows()
    content = ReportContent(title="demo", command="amldist demo", setup=["data"],
                            table_text=format_table(rows, DATASETS),
                            table_markdown=format_markdown(rows, DATASETS), notes=["honest"],
                            figures=[Figure("fig.png", "Fig", "caption text")],
                            runs=[RunSummary("r", "what", "ck.pth", 3, ("runs/r/wandb/offline-run-1",))],
                            stages=[StageTiming("synth", "reused", 1.5, "d"),
                                    StageTiming("eval", "built", 2.0)])
    md_path, html_path = write_report(tmp_path, content)
    markdown = md_path.read_text()
    assert "![Fig](fig.png)" in markdown and "caption text" in markdown
    assert parse_table(markdown.split("```")[1])[1][1]["scores"]["asym"]["ROxf"]["medium"] == 12.3
    assert "runs/r/wandb/offline-run-1" in markdown and "**3.5**" in markdown
    assert "data:image/png;base64," in html_path.read_text()


def test_sizes_table_relates_every_network_to_the_teacher():
    text = format_sizes([SizeRow("teacher", "efficientnet_lite2", 1280, 0.4, 5.0),
                         SizeRow("student", "efficientnet_lite0 + 1×1 conv to 1280", 1280, 0.3, 4.0)], 128)
    lines = text.splitlines()
    assert "GFLOPs at 128×128" in lines[0] and len(lines) == 4
    assert lines[2].endswith("| 0.400 | 5.00 | 1.00 | 1.00 |")
    assert lines[3].endswith("| 0.300 | 4.00 | 0.75 | 0.80 |")


@pytest.mark.parametrize("size", ["lite", "tiny"])
def test_the_demos_students_are_smaller_than_its_teacher(size):
    from amldist.flops import complexity

    settings = demo_settings(size)

    def cost(run):
        teacher = ["model.teacher=t.pth"] if run.key in ("contrplus", "reg") else []
        model = run_config(settings, run, teacher).model
        return complexity(model.arch, model.projection_dim, settings.train_image_size, model.pooling)

    teacher = cost(settings.teacher_run)
    for run in settings.student_runs:
        student = cost(run)
        assert student.gflops < teacher.gflops and student.params_m < teacher.params_m, run.key


def test_force_names_and_groups():
    assert force_set(["students"]) == {r.key for r in STUDENT_RUNS}
    assert force_set(["all"]) == set(STAGES)
    assert force_set(["teacher", "eval"]) == {"teacher", "eval"}
    with pytest.raises(UserError):
        force_set(["nope"])


def test_each_run_is_what_amldist_train_builds_with_the_demo_overrides(tmp_path):
    from amldist.cli.main import build_parser
    from amldist.cli.train import config_of

    settings = demo_settings("micro", data_root=tmp_path / "root", runs_dir=tmp_path / "runs",
                             extra_overrides=("optim.lr=0.002",))
    student = settings.student_runs[0]  # micro: the from-scratch presets, the fastest
    config = run_config(settings, student, ["model.teacher=t.pth"])
    sets = [f"data.root={settings.data_root}", f"data.image_size={settings.train_image_size}",
            *settings.overrides, "model.teacher=t.pth"]
    argv = ["train", "--config", student.preset, "--name", settings.run_name(student),
            "--num-workers", str(settings.num_workers), *[part for item in sets for part in ("--set", item)]]
    assert student.preset == "tiny-student-contrplus-asym"
    assert config == config_of(build_parser().parse_args(argv))  # the user's command trains the same run
    assert config.run.name == "micro-student-contrplus-asym" == settings.run_name(student)
    assert config.data.root == str(tmp_path / "root") and config.data.image_size == 64
    assert config.run.epochs == 1 and config.optim.lr == 0.002 and config.model.teacher == "t.pth"
    assert config.run.num_workers == 2 and config.loss.name == "contrastive_plus"
    assert demo_settings("lite").report_dir == Path("runs/demo")  # make demo's
    assert demo_settings("tiny").report_dir == Path("runs/demo-tiny")
    for size in ("lite", "tiny"):  # the run folder is the preset's name: the students' presets point there
        settings = demo_settings(size)
        teacher = settings.teacher_run
        assert settings.run_name(teacher) == teacher.preset == f"{size}-teacher-contr-sym"
    with pytest.raises(UserError):
        demo_settings("huge")


@pytest.mark.parametrize("size", ["lite", "tiny", "small", "micro"])
def test_every_demo_size_gives_valid_configs_for_all_runs(size):
    settings = demo_settings(size)
    keys = [r.key for r in (settings.teacher_run, *settings.student_runs)]
    assert keys == [r.key for r in (TEACHER_RUN, *STUDENT_RUNS)]
    for run in (settings.teacher_run, *settings.student_runs):
        config = run_config(settings, run, ["model.teacher=t.pth"] if run.key in ("contrplus", "reg") else [])
        assert config.data.image_size == settings.train_image_size
        assert config.run.name.startswith(f"{size}-") and config.run.num_workers == settings.num_workers
        # the report's run table names the preset's network
        assert f": {config.model.arch}," in run.description
    assert settings.test_image_size >= settings.train_image_size


@pytest.mark.parametrize("argv", [["--force", "bogus"], ["--set", "no-equals-sign"], ["--preset", "huge"]])
def test_cli_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    from amldist.cli.main import main

    try:
        code = main(["demo", "--runs-dir", str(tmp_path), "--data-root", str(tmp_path / "data"), *argv])
    except SystemExit as stop:  # argparse's own errors (a bad choice)
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing ran


# ---------------------------------------------------------------- end to end


def test_micro_demo_end_to_end_then_reused(tmp_path, capsys):
    from amldist.demo import run_demo

    settings = demo_settings("micro", data_root=tmp_path / "data", runs_dir=tmp_path / "runs",
                             report_dir=tmp_path / "report")
    settings = dataclasses.replace(settings, max_failures=0)  # no retry may hide a failed run
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)  # shown by pytest when the test fails

    result = run_demo(settings, echo=echo)
    report = tmp_path / "report"
    for name in ("report.md", "report.html", "table.json", "training_curves.png", "hard_negatives.png",
                 "tsne_contrplus.png", "tsne_reg.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    table = json.loads((report / "table.json").read_text())
    labels, printed = parse_table("\n".join(lines))
    assert labels == ["ROxf", "RPar"] and len(printed) == len(table["rows"]) == 4
    for row, stored in zip(printed, table["rows"]):
        assert row["student"] == stored["student"] and row["loss"].split()[0] in {"Contr", "Contr+", "Reg"}
        for mode in ("sym", "asym"):
            for dataset, label in zip(table["datasets"], labels):
                for setting in ("medium", "hard"):
                    value = stored["scores"].get(mode, {}).get(dataset, {}).get(setting)
                    shown = row["scores"][mode][label][setting]
                    assert (shown is None) if value is None else shown == pytest.approx(value, abs=0.051)
    assert printed[0]["scores"]["asym"]["ROxf"]["medium"] is None  # the teacher row: symmetric only
    assert printed[2]["scores"]["asym"]["ROxf"]["medium"] is not None  # Contr+ student: both
    assert {s.status for s in result.stages if s.name != "report"} == {"built"}
    assert len(table["rows_without_whitening"]) == 4 \
        and set(table["random_ranking"]) == set(table["datasets"])
    markdown = (report / "report.md").read_text()
    assert "offline-run-" in markdown and "hard_negatives.png" in markdown and "without whitening" in markdown
    # The claims are read from this run's own table, and printed, stored and reported alike.
    from amldist.demo.claims import Claim, check_claims, format_claims

    by_key = dict(zip(("teacher", "baseline", "contrplus", "reg"), map(TableRow.from_dict, table["rows"])))
    raw = dict(zip(by_key, map(TableRow.from_dict, table["rows_without_whitening"])))
    expected = format_claims(check_claims(by_key, raw, table["random_ranking"]))
    assert [c["letter"] for c in table["claims"]] == list("abcde")
    assert format_claims([Claim(**c) for c in table["claims"]]) == expected
    assert all(f"  {line}" in lines for line in expected)  # printed after the table
    assert all(f"- {line}" in markdown for line in expected)
    assert sum(1 for line in lines if line.startswith("[") and " in " in line) == len(STAGES)

    again = run_demo(settings, echo=lambda line: None)
    statuses = {s.name: s.status for s in again.stages}
    assert all(statuses[name] == "reused" for name in STAGES if name != "report"), statuses
    assert again.table_text == result.table_text

    # Asymmetric search on the micro networks (amldist demo --search): export, index, query, report.
    from amldist.demo.search import run_search_demo

    rows = run_search_demo(settings, echo=print)
    search = report / "search"
    expected = {"contrplus.onnx", "reg.onnx", "index-roxford5k", "index-rparis6k", "search.md", "search.json",
                "contact_sheet.png"}
    assert {p.name for p in search.iterdir()} >= expected
    assert [r.label.split()[0] for r in rows] == ["contrplus", "reg", "student", "teacher"]
    assert all(0.0 <= rate <= 1.0 for row in rows for rate in row.hit_rates.values())
    assert "records no teacher" in json.loads((search / "search.json").read_text())["refusal"]


def test_time_table_gives_each_runs_mean_epoch_and_miner_wait_share():
    from amldist.demo.assemble import time_table

    epoch = {"epoch_time_s": 10.0, "train_time_s": 8.0, "mining_time_s": 1.5, "miner_wait_s": 0.5}
    slow = dict(epoch, epoch_time_s=30.0, miner_wait_s=1.5)
    table = time_table({"a": [epoch, slow, {"val_map": 1.0}], "untimed": [{"loss": 1.0}]}).splitlines()
    assert len(table) == 3  # header, rule, one row: runs without timings are left out
    assert [cell.strip() for cell in table[2].strip("|").split("|")] == ["a", "2", "20.0", "8.0", "1.50",
                                                                         "1.00", "5.0%"]


def test_setup_counts_read_as_words():
    from amldist.demo.assemble import retrieval_counts, split_counts

    assert split_counts({"clusters": 48, "images": 604, "pairs": 1208}) == \
        "604 images in 48 clusters (1208 pairs)"
    assert retrieval_counts({"db": 414, "queries": 70}) == "414 database images and 70 queries"


def test_reused_stages_report_the_time_they_took_to_build(tmp_path):
    from amldist.demo.pipeline import StagePrinter
    from amldist.demo.report import ReportContent, render_markdown
    from amldist.demo.stages import BUILT, REUSED, DemoState

    history = tmp_path / "times.json"
    state = DemoState(demo_settings("micro", runs_dir=tmp_path))
    first = StagePrinter(echo=lambda line: None, history=history)
    first.run("synth", lambda: (BUILT, "made"), state)
    built = first.timings[0].built_seconds
    again = StagePrinter(echo=lambda line: None, history=history)
    again.run("synth", lambda: (REUSED, "there"), state)
    again.run("shards", lambda: (REUSED, "there"), state)
    assert again.timings[0].built_seconds == built and again.timings[1].built_seconds is None
    text = render_markdown(ReportContent(title="t", command="c", setup=[], table_text="", table_markdown="",
                                         stages=again.timings))
    assert f"| synth | reused | {again.timings[0].seconds:.1f} | {built:.1f} | there |" in text
    assert "| shards | reused |" in text and "| – |" in text


def _eval_cache(tmp_path):
    from types import SimpleNamespace

    from amldist.demo import evaluation

    settings, run = SimpleNamespace(report_dir=tmp_path), SimpleNamespace(name="student")
    evaluation._save_descriptors(evaluation.descriptors_path(settings, run), np.ones((40, 8)))
    identity = {"network_sha256": "abc"}
    evaluation.result_path(settings, run).write_text(
        json.dumps({"identity": identity, "results": {"sym": {}}}))
    return evaluation, settings, run, identity


def test_damaged_demo_eval_cache_counts_as_missing(tmp_path):
    evaluation, settings, run, identity = _eval_cache(tmp_path)
    assert evaluation.load_results(settings, run, identity) is not None
    descriptors = evaluation.descriptors_path(settings, run)
    whole = descriptors.read_bytes()
    descriptors.write_bytes(whole[:200])  # truncated
    assert evaluation.load_results(settings, run, identity) is None  # so the eval stage computes it again
    with pytest.raises(UserError, match="damaged eval cache"):
        evaluation.load_descriptors(settings, run)
    descriptors.write_bytes(whole)
    for damaged in ("[1, 2]", '{"identity": {"network_sha256": "abc"}, "results": [1]}', "\xff{"):
        evaluation.result_path(settings, run).write_text(damaged)
        assert evaluation.load_results(settings, run, identity) is None
        assert evaluation.load_results(settings, run) is None
