"""mAP / mP@k on hand-made rankings (values worked out by hand below), protocols, exact ranking."""

import numpy as np
import pytest
from PIL import Image

from amldist import evaluate, evaluation, search
from amldist.cli import eval as eval_cli
from amldist.cli.main import main
from amldist.errors import UserError


def test_compute_ap_by_hand():
    # positives at 0-based positions 0 and 2, 2 positives in all:
    #   j=0, r=0: before = 1, at = 1/1            -> 1
    #   j=1, r=2: before = 1/2, at = 2/3          -> (1/2 + 2/3) / 2 = 7/12
    #   AP = (1 + 7/12) / 2 = 19/24
    assert evaluate.compute_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24)
    # A positive never retrieved still counts in the denominator: (1 + 0) / 2.
    assert evaluate.compute_ap(np.array([0]), 2) == pytest.approx(0.5)


def test_compute_map_with_junk_and_empty_query():
    ranks = np.array([
        [5, 3, 7, 1, 2, 0, 4, 6],
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ])
    gnd = [
        {"ok": [3, 2], "junk": [7]},
        {"ok": [], "junk": [1]},  # no positives: left out of the means
        {"ok": [0]},
    ]
    out = evaluate.compute_map(ranks, gnd, kappas=[1, 5, 10])
    # Query 0: positives 3, 2 at positions 1, 4; junk 7 at position 2.
    #   Junk removed: 1 -> 1 (no junk before), 4 -> 3 (one junk before).
    #   AP: j=0, r=1: (0/1 + 1/2) / 2 = 1/4;  j=1, r=3: (1/3 + 2/4) / 2 = 5/12;  (1/4 + 5/12) / 2 = 1/3
    #   1-based positions [2, 4], last positive 4:
    #   P@1: kq = 1, none <= 1 -> 0;  P@5: kq = min(4, 5) = 4 -> 2/4;  P@10: kq = 4 -> 2/4
    # Query 2: positive first -> AP 1, P@k: kq = min(1, k) = 1 -> 1.
    assert out["aps"][0] == pytest.approx(1 / 3)
    assert np.isnan(out["aps"][1])
    assert out["aps"][2] == pytest.approx(1.0)
    assert out["num_evaluated"] == 2
    assert out["mAP"] == pytest.approx((1 / 3 + 1) / 2)
    np.testing.assert_allclose(out["prs"][0], [0, 0.5, 0.5])
    np.testing.assert_allclose(out["mP"], [(0 + 1) / 2, (0.5 + 1) / 2, (0.5 + 1) / 2])


REVISITED_RANKS = np.array([[4, 1, 6, 0, 3, 2, 5, 7]])
REVISITED_GND = [{"bbx": [0, 0, 1, 1], "easy": [1], "hard": [0, 5], "junk": [6]}]


def test_revisited_protocol_by_hand():
    out = evaluate.evaluate_ranks(REVISITED_RANKS, REVISITED_GND)
    # Positions: 4:0 1:1 6:2 0:3 3:4 2:5 5:6 7:7
    # Easy: ok [1], junk [6, 0, 5] at [2, 3, 6]. 1 at position 1, no junk before -> 1.
    #   AP = (0 + 1/2) / 2 = 1/4. 1-based [2]: P@1 kq=1 -> 0; P@5 kq=2 -> 1/2; P@10 -> 1/2
    assert out["easy"] == pytest.approx({"mAP": 25.0, "mP@1": 0.0, "mP@5": 50.0, "mP@10": 50.0})
    # Medium: ok [1, 0, 5] at [1, 3, 6], junk [6] at 2 -> adjusted [1, 2, 5].
    #   AP = [(0 + 1/2)/2 + (1/2 + 2/3)/2 + (2/5 + 3/6)/2] / 3 = (1/4 + 7/12 + 9/20) / 3 = 77/180
    #   1-based [2, 3, 6]: P@1 -> 0; P@5 kq=5 -> 2/5; P@10 kq=min(6,10)=6 -> 3/6
    assert out["medium"] == pytest.approx({"mAP": 100 * 77 / 180, "mP@1": 0.0, "mP@5": 40.0, "mP@10": 50.0})
    # Hard: ok [0, 5] at [3, 6], junk [6, 1] at [2, 1] -> adjusted [1, 4].
    #   AP = [(0 + 1/2)/2 + (1/4 + 2/5)/2] / 2 = (1/4 + 13/40) / 2 = 23/80
    #   1-based [2, 5]: P@1 -> 0; P@5 kq=5 -> 2/5; P@10 kq=5 -> 2/5
    assert out["hard"] == pytest.approx({"mAP": 100 * 23 / 80, "mP@1": 0.0, "mP@5": 40.0, "mP@10": 40.0})


def test_medium_positives_are_easy_plus_hard():
    gnd = [{"easy": [3, 1], "hard": [7], "junk": [2]}]
    medium = evaluate.revisited_gnd(gnd, "medium")[0]
    assert sorted(medium["ok"]) == [1, 3, 7]
    assert list(medium["junk"]) == [2]
    assert sorted(evaluate.revisited_gnd(gnd, "hard")[0]["junk"]) == [1, 2, 3]
    assert sorted(evaluate.revisited_gnd(gnd, "easy")[0]["junk"]) == [2, 7]


def test_old_protocol_uses_ok_and_junk_as_given():
    ranks = np.array([[2, 0, 1, 3]])
    gnd = [{"bbx": [0, 0, 1, 1], "ok": [0, 3], "junk": [2]}]
    out = evaluate.evaluate_ranks(ranks, gnd)
    # junk 2 at position 0 is removed: 0 at 1 -> 0, 3 at 3 -> 2.
    #   AP = [1 + (1/2 + 2/3)/2] / 2 = (1 + 7/12) / 2 = 19/24
    #   1-based [1, 3]: P@1 -> 1; P@5 kq = 3 -> 2/3; P@10 -> 2/3
    assert list(out) == ["old"]
    assert out["old"]["mAP"] == pytest.approx(100 * 19 / 24)
    assert out["old"]["mP@5"] == pytest.approx(100 * 2 / 3)


def test_truncated_ranking_counts_missing_positives_as_not_retrieved():
    ranks = np.array([[0, 5]])  # top-2 of a larger database; positive 9 is beyond it
    out = evaluate.compute_map(ranks, [{"ok": [0, 9]}], kappas=[1])
    assert out["aps"][0] == pytest.approx(0.5)  # (1 + 0) / 2


def test_rank_database_is_exact():
    rng = np.random.default_rng(0)
    db, queries = rng.standard_normal((50, 8)), rng.standard_normal((4, 8))
    expected = np.argsort(-(queries @ db.T), axis=1)
    np.testing.assert_array_equal(evaluate.rank_database(db, queries), expected)
    np.testing.assert_array_equal(evaluate.rank_database(db, queries, topk=5), expected[:, :5])


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch"])
def test_every_search_answers_like_brute_force(backend):
    rng = np.random.default_rng(3)
    db = rng.standard_normal((40, 6)).astype(np.float32)
    queries = rng.standard_normal((25, 6)).astype(np.float32)  # >= 20: faiss takes its BLAS path
    # torch-cuda's search is device-agnostic: checked on the CPU here, on the GPU in test_gpu/test_mining
    top_k = search.searcher(db, backend) if backend != "torch" else search.torch_topk_search(db, device="cpu")
    scores, ids = top_k(queries, 7)
    expected = np.argsort(-(queries @ db.T), axis=1)[:, :7]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ db.T, expected, axis=1), rtol=1e-5)
    assert top_k(queries[:3], 100)[1].shape == (3, 40)  # k capped at the database size
    assert top_k(queries[:0], 5)[1].shape == (0, 5)
    with pytest.raises(ValueError, match="dimension"):
        top_k(queries[:, :4], 3)


def test_backend_choice_without_gpu():
    assert search.choose_backend("auto") == "faiss-cpu"  # tests run with CUDA hidden and faiss-cpu
    assert search.choose_backend("faiss-cpu") == "faiss-cpu"
    for unusable in ("tpu", "faiss-gpu", "torch-cuda"):
        with pytest.raises(UserError):
            search.choose_backend(unusable)


def test_distractors_push_positives_down():
    db = np.array([[1.0, 0.0], [0.0, 1.0]])
    query = np.array([[0.6, 0.8]])  # scores: db0 0.6, db1 0.8
    gnd = [{"ok": [0], "junk": []}]
    assert evaluate.evaluate_descriptors(db, query, gnd)["old"]["mAP"] == pytest.approx(25.0)  # positive 2nd
    distractors = np.array([[0.8, 0.6], [-1.0, 0.0]])  # 0.96 beats it, -0.6 does not
    ranks = evaluate.rank_with_distractors(db, distractors, query)
    assert list(ranks[0]) == [2, 1, 0, 3]  # distractors get indices len(db) + j
    # Positive now third, nothing junk: AP = (0 + 1/3) / 2 = 1/6
    assert evaluate.evaluate_descriptors(db, query, gnd, distractors)["old"]["mAP"] == pytest.approx(100 / 6)


def test_asymmetric_queries_against_teacher_database_differ_from_symmetric():
    rng = np.random.default_rng(2)
    teacher_db = rng.standard_normal((20, 16))
    teacher_db /= np.linalg.norm(teacher_db, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    student_db = teacher_db @ rotation  # a student that only agrees with itself
    gnd = [{"ok": [i], "junk": []} for i in range(5)]
    # Sym: student queries vs student db finds each image first.
    assert evaluate.evaluate_descriptors(student_db, student_db[:5], gnd)["old"]["mAP"] == \
        pytest.approx(100.0)
    # Asym: the same student queries vs the teacher db live in another space and fail.
    assert evaluate.evaluate_descriptors(teacher_db, student_db[:5], gnd)["old"]["mAP"] < 60.0
    # A student that matches the teacher's coordinates does as well asymmetrically.
    assert evaluate.evaluate_descriptors(teacher_db, teacher_db[:5], gnd)["old"]["mAP"] == \
        pytest.approx(100.0)


def test_bad_ranks_shape_is_rejected():
    with pytest.raises(ValueError):
        evaluate.compute_map(np.zeros((2, 3), np.int64), [{"ok": [0]}])


# ---------------------------------------------------------------- `amldist eval`



def test_multiscale_parser_computes_arithmetic_and_rejects_code():
    assert eval_cli.parse_scales("[1, 1/2**(1/2), 1/2]") == pytest.approx([1, 2 ** -0.5, 0.5])
    assert eval_cli.parse_scales("1") == [1.0]
    assert eval_cli.parse_scales("(1, 0.5)") == [1.0, 0.5]
    for bad in ["__import__('os').system('true')", "[1, x]", "[1, (lambda: 1)()]", "[]", "[1, -0.5]",
                "[2**10**10]", "[1/0]", "[1e999]", "['1']", "[1,", "open('f')", "[1] * 3"]:
        with pytest.raises(UserError):
            eval_cli.parse_scales(bad)


def test_whitening_cache_path_sits_beside_the_network(tmp_path):
    path = evaluation.whitening_cache_path(tmp_path / "model_best.pth.tar", "retrieval-SfM-120k", 1024, True)
    assert path == tmp_path / "model_best.retrieval-SfM-120k-1024.whiten-ms.pt"
    assert evaluation.whitening_cache_path(tmp_path / "s.pt", "w", 362, False).name == "s.w-362.whiten.pt"


def test_format_table_rows_and_columns():
    scores = {"easy": {"mAP": 90.0, "mP@10": 80.0}, "medium": {"mAP": 70.0, "mP@10": 60.0},
              "hard": {"mAP": 50.0, "mP@10": 40.0}}
    table = evaluate.format_table({"sym": {"roxford5k": {"raw": scores, "whiten": scores}},
                                   "asym": {"roxford5k": {"raw": scores}},
                                   "teacher": {"oxford5k": {"raw": {"old": {"mAP": 12.34, "mP@10": 5.0}}}}})
    lines = table.splitlines()
    assert "roxford5k" in lines[0] and "oxford5k" in lines[0]
    assert lines[3].split()[:7] == ["sym", "-", "90.0", "70.0", "50.0", "60.0", "40.0"]
    assert lines[4].split()[:2] == ["sym", "Lw"]
    assert lines[5].split()[:2] == ["asym", "-"] and "n/a" in lines[5]
    assert lines[6].split()[-2:] == ["12.3", "5.0"]


def _tiny_root(root):
    """A test set (6 db images, 2 queries) and a whitening set of 8 images, 24-40 px."""
    from amldist.datasets import formats, layout

    rng = np.random.default_rng(0)

    def image(path, w, h):
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path, "JPEG", quality=95)

    jpg = layout.test_images_dir(root, "roxford5k")
    names = [f"im{i}" for i in range(8)]
    for i, name in enumerate(names):
        image(jpg / f"{name}.jpg", 40 - 2 * i, 32)
    gnd = [{"bbx": [2.0, 2.0, 30.0, 28.0], "easy": [0, 1], "hard": [2], "junk": [3]},
           {"bbx": [0.0, 0.0, 20.0, 20.0], "easy": [4], "hard": [], "junk": []}]
    formats.write_gnd(layout.gnd_path(root, "roxford5k"), formats.GroundTruth(names[:6], names[6:], gnd))
    cids = [f"{i:032x}" for i in range(1, 9)]
    for cid in cids:
        image(layout.cid2filename(cid, layout.train_images_dir(root, "retrieval-SfM-120k")), 36, 28)
    qidxs, pidxs = np.arange(4), np.arange(4, 8)
    formats.write_whiten_db(layout.whiten_db_path(root, "retrieval-SfM-120k"),
                            formats.WhitenDb(cids, qidxs, pidxs))
    split = formats.SfmSplit(cids, np.repeat(np.arange(4), 2), qidxs, pidxs)
    formats.write_sfm_db(layout.train_db_path(root, "retrieval-SfM-120k"), {"train": split, "val": split})


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    import torch

    from amldist.checkpoints import export_network_file, save_checkpoint
    from amldist.nets import create_net

    base = tmp_path_factory.mktemp("eval")
    _tiny_root(base / "data")
    torch.manual_seed(0)
    save_checkpoint(base / "nets" / "student.pt", create_net("small_cnn", pretrained=False), epoch=0)
    torch.manual_seed(1)  # the teacher as a plain cirtorch/aml {'state_dict', 'meta'} network file
    export_network_file(base / "nets" / "teacher.pt", create_net("small_cnn", pretrained=False))
    return base


def _eval_args(base, *extra):
    return ["eval", "--network", str(base / "nets" / "student.pt"), "--data-root", str(base / "data"),
            "-d", "roxford5k", "--image-size", "32", "--workers", "0", "--device", "cpu", *extra]


def test_eval_cli_sym_teacher_asym_with_whitening(eval_setup, capsys):
    import json

    base = eval_setup
    out = base / "results.json"
    argv = _eval_args(base, "--teacher", str(base / "nets" / "teacher.pt"), "--asym", "-w",
                      "retrieval-SfM-120k", "-ms", "[1, 1/2]", "--out", str(out))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "roxford5k" in printed and "asym" in printed and "Lw" in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"sym", "teacher", "asym"}
    assert set(results["asym"]["roxford5k"]) == {"raw", "whiten"}
    assert set(results["sym"]["roxford5k"]["raw"]) == {"easy", "medium", "hard"}
    # Student queries against the teacher's database are not the student's own search.
    assert results["asym"]["roxford5k"] != results["sym"]["roxford5k"]
    # Whitening is learned once per database network (the teacher's serves asym) and cached beside it.
    cached = sorted(p.name for p in (base / "nets").glob("*.whiten-ms.pt"))
    assert cached == ["student.retrieval-SfM-120k-32.whiten-ms.pt",
                      "teacher.retrieval-SfM-120k-32.whiten-ms.pt"]
    stamps = {p: p.stat().st_mtime_ns for p in (base / "nets").glob("*.whiten-ms.pt")}
    assert main(argv) == 0  # a rerun reuses the cached whitening and gives the same numbers
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads(out.read_text())["results"] == results


def test_eval_uses_the_whitening_stored_in_the_network_meta(eval_setup, tmp_path):
    from amldist import whiten
    from amldist.checkpoints import load_checkpoint

    net, _ = load_checkpoint(eval_setup / "nets" / "student.pt")
    dim = net.meta.outputdim
    net.meta.extra["Lw"] = {"retrieval-SfM-120k": {"ss": {"m": np.zeros((dim, 1)), "P": 3 * np.eye(dim)}}}
    loaded = evaluation.LoadedNet("student", tmp_path / "student.pt", net)
    empty_root = tmp_path / "no-data"  # learning would need images; the stored Lw must be used
    cache = evaluation.DescriptorCache(evaluation.EvalSettings(empty_root, (), 32, batch_size=4, workers=0))
    lw = evaluation.whitening_for(loaded, "retrieval-SfM-120k", cache)
    assert isinstance(lw, whiten.Whitening)
    np.testing.assert_array_equal(lw.P, 3 * np.eye(dim))
    assert not list(tmp_path.glob("*.whiten*"))


@pytest.mark.parametrize("extra, message", [
    (["-ms", "__import__('os').getcwd()"], "--multiscale"),
    (["--asym"], "--asym needs --teacher"),
    (["-d", "holidays"], "unknown dataset"),
    (["-d", "rparis6k"], "no ground truth for rparis6k"),
    (["-w", "retrieval-SfM-30k"], "no whitening pairs"),
    (["-w", "my-landmarks"], "no whitening pairs for my-landmarks"),  # an imported set's name is a choice
    (["-w", "roxford5k"], "not a training set"),
    (["--image-size", "0"], "must be > 0"),
])
def test_eval_cli_bad_input_is_one_line_exit_2(eval_setup, capsys, extra, message):
    try:
        code = main(_eval_args(eval_setup, *extra))
    except SystemExit as exit_:  # argparse type errors exit from inside parse_args
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _no_evaluation(monkeypatch):
    """Checks of --out must come before any network is loaded."""
    monkeypatch.setattr("amldist.evaluation.modes.load_net",
                        lambda *args, **kwargs: pytest.fail("evaluated before checking --out"))


def test_eval_out_refuses_to_replace_a_file_that_is_not_our_results(eval_setup, tmp_path, capsys,
                                                                    monkeypatch):
    import json
    import shutil

    _no_evaluation(monkeypatch)
    checkpoint = tmp_path / "copy.pth.tar"
    shutil.copy(eval_setup / "nets" / "student.pt", checkpoint)
    other_json = tmp_path / "list.json"
    other_json.write_text(json.dumps([1, 2]))
    for out in (checkpoint, other_json):
        before = out.read_bytes()
        assert main(_eval_args(eval_setup, "--out", str(out))) == 2
        err = capsys.readouterr().err
        assert "is not an amldist eval results file" in err and err.count("\n") == 1
        assert out.read_bytes() == before


@pytest.mark.parametrize("where, message", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: tmp / "file.txt" / "results.json", "is a file, not a folder"),
    (lambda tmp: tmp / "file.txt" / "deeper" / "results.json", "is a file, not a folder"),
])
def test_eval_out_location_is_checked_before_evaluating(eval_setup, tmp_path, capsys, monkeypatch, where,
                                                        message):
    _no_evaluation(monkeypatch)
    (tmp_path / "file.txt").write_text("keep me")
    assert main(_eval_args(eval_setup, "--out", str(where(tmp_path)))) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_eval_out_in_an_unwritable_folder_is_refused_early(eval_setup, tmp_path, capsys, monkeypatch):
    import os

    _no_evaluation(monkeypatch)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod is ignored
    assert main(_eval_args(eval_setup, "--out", str(tmp_path / "results.json"))) == 2
    assert f"cannot write in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("lw, message", [
    ("nope", "meta['Lw'] is a str, not a dict"),
    ({"retrieval-SfM-120k": [1, 2]}, "meta['Lw']['retrieval-SfM-120k'] is a list"),
    ({"retrieval-SfM-120k": {"ss": {"m": "abc", "P": "def"}}}, "whitening 'm' is not an array of numbers"),
    ({"retrieval-SfM-120k": {"ss": {"m": np.zeros(3), "P": np.eye(3)}}}, "expects 3-D descriptors"),
])
def test_damaged_whitening_in_the_network_meta_names_the_file(eval_setup, tmp_path, lw, message):
    from amldist.checkpoints import load_checkpoint

    net, _ = load_checkpoint(eval_setup / "nets" / "student.pt")
    net.meta.extra["Lw"] = lw
    loaded = evaluation.LoadedNet("student", tmp_path / "student.pt", net)
    cache = evaluation.DescriptorCache(evaluation.EvalSettings(tmp_path, (), 32, batch_size=4, workers=0))
    with pytest.raises(UserError) as exc:
        evaluation.whitening_for(loaded, "retrieval-SfM-120k", cache)
    assert str(exc.value).startswith(f"damaged network file {tmp_path / 'student.pt'}: ") \
        and message in str(exc.value)


def _whitening_of(network_path, eval_setup):
    net = evaluation.load_net("student", network_path, "cpu")
    cache = evaluation.DescriptorCache(evaluation.EvalSettings(eval_setup / "data", (), 32, batch_size=4,
                                                               workers=0))
    return evaluation.whitening_for(net, "retrieval-SfM-120k", cache)


def test_damaged_whitening_cache_is_learned_again(eval_setup, tmp_path, caplog, monkeypatch):
    import logging
    import shutil

    from amldist import whiten

    # earlier tests in the session (Ray's set-up in a demo run, a worker's quiet logs) may have raised the
    # log level or cut propagation: either hides the warning from caplog
    caplog.set_level(logging.WARNING, logger="amldist")
    monkeypatch.setattr(logging.getLogger("amldist"), "propagate", True)
    monkeypatch.setattr(logging.getLogger(evaluation.whitening.__name__), "disabled", False)

    network = tmp_path / "student.pt"
    shutil.copy(eval_setup / "nets" / "student.pt", network)
    learned = _whitening_of(network, eval_setup)
    cache = evaluation.whitening_cache_path(network, "retrieval-SfM-120k", 32, False)
    cache.write_bytes(np.random.default_rng(17).bytes(256))  # torch.load fails with IndexError on these
    again = _whitening_of(network, eval_setup)
    assert "ignoring the whitening cache" in caplog.text
    np.testing.assert_allclose(again.P, learned.P)
    np.testing.assert_allclose(whiten.load_whitening(cache).P, learned.P)  # and the cache is whole again


def test_whitening_cache_of_a_replaced_network_is_not_reused(eval_setup, tmp_path):
    import torch

    from amldist.checkpoints import save_checkpoint
    from amldist.nets import create_net

    network = tmp_path / "model_best.pth"
    torch.manual_seed(5)
    save_checkpoint(network, create_net("small_cnn", pretrained=False), epoch=1)
    first = _whitening_of(network, eval_setup)
    torch.manual_seed(6)  # retrained: same name, same dimension, other weights
    save_checkpoint(network, create_net("small_cnn", pretrained=False), epoch=2)
    second = _whitening_of(network, eval_setup)
    assert not np.allclose(second.P, first.P)
    cache = evaluation.whitening_cache_path(network, "retrieval-SfM-120k", 32, False)
    cache.unlink()
    # what learning from scratch gives
    np.testing.assert_allclose(_whitening_of(network, eval_setup).P, second.P)
