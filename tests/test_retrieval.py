"""Asymmetric search for users: PIL-exact preprocessing in tensors, the exported student against its
checkpoint, the gallery index (flat, IVF-PQ, incremental == full rebuild), the query-network checks and
the commands. Random networks throughout (what is checked holds for any weights); the trained students
are in tests/test_retrieval_asym.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from amldist import extract, search
from amldist.checkpoints import save_checkpoint
from amldist.errors import UserError
from amldist.feature_store import file_sha256
from amldist.nets import create_net
from amldist.nets.meta import TEACHER_KEY
from amldist.retrieval import preprocess
from amldist.retrieval.export import TOLERANCE, export_query_network, whitening_digest
from amldist.retrieval.gallery import folder_gallery
from amldist.retrieval.index import GalleryIndex, IndexSettings, add_to_index, build_index
from amldist.retrieval.query import AsymmetricSearch, check_query_network, parse_bbx
from amldist.retrieval.query_net import load_query_network
from amldist.whiten import Whitening

SIZE = 48  # the trained image size of the test networks


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random content plus grain: every resize path (box reduction, both Lanczos orders) shows."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8)
    smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    base = np.asarray(smooth, dtype=np.int16)
    grain = rng.integers(-30, 31, size=base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def _write_gallery(folder, count: int, seed: int = 0, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(90, 64), (64, 90), (120, 80), (77, 51), (200, 140)]
    for i in range(start, start + count):
        _picture(*shapes[i % len(shapes)], seed=seed + i).save(folder / f"img{i:03d}.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A random small_cnn teacher, a mini_cnn student that records it, one that records another teacher,
    and one that records none; all 128-D."""
    folder = tmp_path_factory.mktemp("nets")
    torch.manual_seed(1)
    save_checkpoint(folder / "teacher.pt", create_net("small_cnn", "gem", None, pretrained=False), epoch=1)
    sha = file_sha256(folder / "teacher.pt")
    files = {"teacher": folder / "teacher.pt"}
    for name, record in (("student", sha), ("other", "f" * 64), ("alone", None)):
        torch.manual_seed(2)
        student = create_net("mini_cnn", "gem", 128, pretrained=False)
        student.pool.p.data.fill_(2.6)
        if record:
            student.meta.extra[TEACHER_KEY] = {"network_sha256": record, "architecture": "small_cnn",
                                               "dim": 128, "network": "teacher.pt"}
        files[name] = save_checkpoint(folder / f"{name}.pt", student, epoch=1,
                                      config={"data": {"image_size": SIZE}})
    torch.manual_seed(3)
    files["small"] = save_checkpoint(folder / "small.pt", create_net("mini_cnn", "gem", 64, pretrained=False),
                                     epoch=1, config={"data": {"image_size": SIZE}})
    return files


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    return _write_gallery(tmp_path_factory.mktemp("gallery"), 12)


@pytest.fixture(scope="module")
def whitening():
    rng = np.random.default_rng(5)
    return Whitening(m=rng.normal(size=128) * 0.02, P=np.linalg.qr(rng.normal(size=(128, 128)))[0] * 1.5)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size,side", [((640, 479), 128), ((1000, 130), 128), ((130, 1000), 64),
                                       ((50, 40), 128), ((333, 777), 100), ((1200, 900), 362),
                                       ((129, 128), 128), ((700, 700), 47.6), ((20, 900), 128),
                                       ((257, 129), 128)])
def test_thumbnail_equals_pil_pixel_for_pixel(size, side):
    """Box reduction (factors 1..8, unequal per axis), both Lanczos pass orders, images that fit."""
    picture = _picture(*size, seed=sum(size))
    expected = picture.copy()
    expected.thumbnail((side, side), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(picture))
    got = preprocess.thumbnail(pixels, torch.tensor([float(side)], dtype=torch.float64))
    assert tuple(got.shape) == (expected.height, expected.width, 3)
    assert np.array_equal(got.numpy(), np.asarray(expected).astype(np.float64))


@pytest.mark.parametrize("box", [(10.4, 5.5, 60.5, 40.2), (0.0, 0.0, 90.0, 64.0), (44.5, 31.5, 45.2, 33.0)])
def test_query_crop_equals_extract_prepare_image(tmp_path, box):
    path = tmp_path / "q.png"
    _picture(90, 64, seed=7).save(path)
    expected = extract.prepare_image(extract.FileSource([path], [box]), 0, image_size=SIZE)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    got = preprocess.prepare(pixels, torch.tensor(box, dtype=torch.float32), float(SIZE))
    assert np.array_equal(got.numpy(), np.asarray(expected).astype(np.float64))


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_student_reproduces_its_checkpoint(nets, gallery_dir, whitening, tmp_path, fmt):
    images = sorted(gallery_dir.iterdir())[:3]
    report = export_query_network(nets["student"], tmp_path / f"s.{fmt}", fmt, check_images=images,
                                  scales=(1.0, 2 ** -0.5), whitening=whitening, whitening_source="test")
    assert report.check.passed and report.check.max_abs_diff <= TOLERANCE and report.check.images == 3
    assert report.metadata["image_size"] == SIZE and report.metadata["teacher"]["architecture"] == "small_cnn"
    query = load_query_network(tmp_path / f"s.{fmt}")
    assert query.kind == fmt and query.dim == 128 and query.baked_whitening == whitening_digest(whitening)
    # Images of sizes the trace never saw, whole and as cropped queries, against the checkpoint itself.
    others = [_picture(300, 170, seed=11), _picture(41, 97, seed=12)]
    checkpoint = load_query_network(nets["student"])
    checkpoint.configure(SIZE, (1.0, 2 ** -0.5), whitening)
    for picture, box in zip(others, [None, (3.5, 10.0, 30.2, 80.0)]):
        assert np.abs(query.embed(picture, box) - checkpoint.embed(picture, box)).max() <= TOLERANCE


@pytest.mark.slow
def test_exported_efficientnet_lite_student_pads_each_image_size_as_tensorflow(gallery_dir, tmp_path):
    """Issue 20's pretrained students use TensorFlow-'SAME' convolutions, whose padding depends on the
    input size: one ONNX graph must pad every image (odd, even, cropped) as the checkpoint does."""
    torch.manual_seed(4)
    student = create_net("efficientnet_lite0", "gem", 64, pretrained=False)
    path = save_checkpoint(tmp_path / "lite.pt", student, epoch=1, config={"data": {"image_size": SIZE}})
    report = export_query_network(path, tmp_path / "lite.onnx", "onnx",
                                  check_images=sorted(gallery_dir.iterdir())[:2])
    assert report.check.passed, report.check.line("onnx")
    query, checkpoint = load_query_network(tmp_path / "lite.onnx"), load_query_network(path)
    checkpoint.configure(SIZE, (1.0,), None)
    picture = _picture(151, 77, seed=13)
    for box in (None, (3.5, 10.0, 120.2, 70.0)):
        assert np.abs(query.embed(picture, box) - checkpoint.embed(picture, box)).max() <= TOLERANCE


def test_export_command_prints_the_check_and_refuses_bad_outputs(nets, gallery_dir, tmp_path, capsys):
    from amldist.cli.main import main

    out = tmp_path / "student.pt"
    base = ["export", "--network", str(nets["student"]), "--format", "torchscript",
            "--images", str(gallery_dir)]
    assert main([*base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check: torchscript on 8 images" in printed and "within the tolerance 1e-05" in printed
    assert main([*base, "--out", str(out)]) == 2  # exists: --force replaces it
    assert main([*base, "--out", str(nets["student"]), "--force"]) == 2  # never the checkpoint itself
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--force" in errors[0] and "itself" in errors[1]


# ---------------------------------------------------------------- index


def _settings(**changes) -> IndexSettings:
    return IndexSettings(**{"image_size": SIZE, "workers": 0, **changes})


def test_incremental_index_equals_a_full_rebuild(nets, tmp_path):
    folder = _write_gallery(tmp_path / "photos", 8)
    first = build_index(nets["teacher"], folder_gallery(folder), tmp_path / "inc", _settings())
    assert (first.count, first.embedded) == (8, 8)
    _write_gallery(folder, 5, start=8)                                    # five new images
    (folder / "img002.jpg").unlink()                                      # one removed
    _picture(90, 64, seed=99).save(folder / "img003.jpg", quality=92)     # one replaced
    update = add_to_index(tmp_path / "inc")
    assert (update.count, update.embedded, update.kept, update.removed) == (12, 6, 6, 1)
    full = build_index(nets["teacher"], folder_gallery(folder), tmp_path / "full", _settings())
    inc, ref = GalleryIndex.open(tmp_path / "inc"), GalleryIndex.open(tmp_path / "full")
    assert inc.entries == ref.entries and full.count == 12
    np.testing.assert_allclose(inc.raw_vectors(), ref.raw_vectors(), atol=1e-5)  # batches differ, not images
    queries = ref.raw_vectors()[:5]
    assert np.array_equal(inc.search(queries, 12)[1], ref.search(queries, 12)[1])
    assert add_to_index(tmp_path / "inc").embedded == 0  # nothing new: nothing embedded
    leftovers = sorted(p.name.split("-")[0] for p in (tmp_path / "inc").iterdir())
    assert leftovers == ["images", "index", "manifest.json", "vectors"]  # the old files are gone


@pytest.mark.slow
def test_index_over_ray_workers_equals_one_process(nets, gallery_dir, tmp_path):
    """--ray-workers: the gallery spread over Ray tasks (distributed_extract), as evaluation embeds R1M."""
    ray = pytest.importorskip("ray")
    build_index(nets["teacher"], folder_gallery(gallery_dir), tmp_path / "one", _settings())
    try:
        build_index(nets["teacher"], folder_gallery(gallery_dir), tmp_path / "ray", _settings(ray_workers=2))
    finally:
        ray.shutdown()
    one, spread = GalleryIndex.open(tmp_path / "one"), GalleryIndex.open(tmp_path / "ray")
    assert one.entries == spread.entries
    np.testing.assert_allclose(spread.raw_vectors(), one.raw_vectors(), atol=1e-5)


def test_compressed_index_recall_and_an_identical_rebuild(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vectors = centres[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    params = search.ivfpq_parameters(len(vectors), 32)
    assert params == {"nlist": 76, "pq_m": 4, "nbits": 6, "nprobe": 19}
    index = search.build_faiss_index(vectors, "ivfpq", params)
    recall, used = search.recall_against_flat(index, vectors, 10)
    assert used == 1000 and 0.1 < recall < 1.0  # approximate, but far above chance (10 of 3000)
    finer = search.build_faiss_index(vectors, "ivfpq", {**params, "pq_m": 16, "nbits": 8, "nprobe": 76})
    assert search.recall_against_flat(finer, vectors, 10)[0] > max(0.6, recall)  # more bytes, every list
    again = search.build_faiss_index(vectors, "ivfpq", params)  # seeded k-means: the same index
    ids = search.index_search(index, vectors[:50], 10)[1]
    assert np.array_equal(ids, search.index_search(again, vectors[:50], 10)[1])
    with pytest.raises(UserError, match="pq_m"):
        search.ivfpq_parameters(100, 32, pq_m=5)


def test_index_command_compress_and_add(nets, tmp_path, capsys):
    from amldist.cli.main import main

    folder = _write_gallery(tmp_path / "photos", 10)
    out = tmp_path / "idx"
    base = ["index", "--network", str(nets["teacher"]), "--images", str(folder), "--out", str(out),
            "--image-size", str(SIZE), "--workers", "0"]
    assert main([*base, "--compress"]) == 0
    printed = capsys.readouterr().out
    assert "10 images (10 embedded" in printed and "recall@10" in printed and "exact flat index" in printed
    assert main(base) == 2  # an index is there: --add or --force
    assert main(["index", "--add", "--out", str(out), "--multiscale", "[1, 0.5]"]) == 2  # a rebuild setting
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--add updates it, --force rebuilds it" in errors[0]
    assert "--multiscale" in errors[1]
    _write_gallery(folder, 2, start=10)
    assert main(["index", "--add", "--out", str(out), "--workers", "0"]) == 0
    assert "12 images (2 embedded, 10 kept, 0 removed)" in capsys.readouterr().out
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["index", "--network", str(nets["teacher"]), "--images", str(folder), "--out",
                 str(tmp_path / "notes")]) == 2
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"  # never written into another folder
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "not part of a gallery index" in errors[0]


# ---------------------------------------------------------------- the query network checks


@pytest.fixture(scope="module")
def teacher_index(nets, gallery_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(nets["teacher"], folder_gallery(gallery_dir), out, _settings())
    return out


def test_students_of_another_teacher_or_dimension_are_refused(nets, teacher_index):
    index = GalleryIndex.open(teacher_index)
    check_query_network(index, load_query_network(nets["student"]))        # trained against this teacher
    check_query_network(index, load_query_network(nets["teacher"]))        # the index's own network
    with pytest.raises(UserError, match="trained against teacher small_cnn ffffffffffff") as other:
        check_query_network(index, load_query_network(nets["other"]))
    with pytest.raises(UserError, match="records no teacher"):
        check_query_network(index, load_query_network(nets["alone"]))
    check_query_network(index, load_query_network(nets["alone"]), skip_teacher_check=True)
    with pytest.raises(UserError, match="gives 64-D descriptors, .* holds 128-D"):
        check_query_network(index, load_query_network(nets["small"]), skip_teacher_check=True)
    assert "\n" not in str(other.value)


def test_a_baked_whitening_must_be_the_index_s(nets, gallery_dir, teacher_index, whitening, tmp_path):
    images = sorted(gallery_dir.iterdir())[:1]
    export_query_network(nets["student"], tmp_path / "w.onnx", "onnx", check_images=images,
                         whitening=whitening)
    with pytest.raises(UserError, match="bakes in whitening"):
        check_query_network(GalleryIndex.open(teacher_index), load_query_network(tmp_path / "w.onnx"))


def test_search_command_json_and_contact_sheet(nets, gallery_dir, teacher_index, tmp_path, capsys):
    from amldist.cli.main import main

    query = sorted(gallery_dir.iterdir())[4]
    sheet = tmp_path / "sheet.png"
    argv = ["search", "--index", str(teacher_index), "--query-network", str(nets["student"]),
            "--image", str(query), "-k", "5", "--json", "--contact-sheet", str(sheet)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert Image.open(sheet).size[0] > 5 * 100
    searcher = AsymmetricSearch(GalleryIndex.open(teacher_index), load_query_network(nets["student"]))
    hits = searcher.search(Image.open(query).convert("RGB"), None, 5)
    assert [h.name for h in hits] == [r["name"] for r in result["results"]]
    # Refusals are one line, exit 2: another teacher, another dimension, a box outside the image, a
    # malformed box.
    for extra in (["--query-network", str(nets["other"])],
                  ["--query-network", str(nets["small"]), "--skip-teacher-check"],
                  ["--bbx", "0,0,5000,10"], ["--bbx", "1,2,3"]):
        assert main([*argv[:-2], *extra]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "trained against teacher" in errors[0] and "gives 64-D" in errors[1]
    assert "not inside" in errors[2] and "four numbers" in errors[3]
    assert parse_bbx("1, 2.5,3,4") == (1.0, 2.5, 3.0, 4.0)


# ---------------------------------------------------------------- the endpoint


@pytest.mark.slow
def test_endpoint_under_load_answers_every_query_right_and_refuses_malformed_uploads(nets, gallery_dir,
                                                                                     teacher_index, tmp_path):
    """A bounded load test on the loopback interface: 4 clients for 4 s (at most 400 queries)."""
    import io

    from amldist.retrieval.loadtest import LoadQuery, run_load_test
    from amldist.retrieval.server import start_in_thread

    export_query_network(nets["student"], tmp_path / "s.onnx", "onnx",
                         check_images=sorted(gallery_dir.iterdir())[:1])
    searcher = AsymmetricSearch(GalleryIndex.open(teacher_index), load_query_network(tmp_path / "s.onnx"))
    queries = []
    for i, path in enumerate(sorted(gallery_dir.iterdir())[:4]):
        picture = Image.open(path).convert("RGB")
        bbx = None if i % 2 else (2.0, 3.0, picture.width - 5.5, picture.height - 2.0)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        expected = tuple(h.name for h in searcher.search(picture, bbx, 5))
        queries.append(LoadQuery(buffer.getvalue(), bbx, 5, expected))
    with start_in_thread(searcher) as server:
        assert server.url.startswith("http://127.0.0.1:")
        report = run_load_test(server.url, queries, concurrency=4, duration_s=4.0, max_requests=400)
    summary = report.summary()
    assert report.requests > 0 and report.failed == 0 and report.mismatched == 0, summary
    assert summary["p50_ms"] <= summary["p99_ms"]
    assert all(m["ok"] for m in report.malformed), report.malformed
    assert {m["status"] for m in report.malformed} == {400}
    with pytest.raises(UserError, match="loopback"):
        run_load_test("http://10.0.0.1:80", queries, duration_s=1.0)


def test_endpoint_refuses_an_oversized_upload_with_413(nets, teacher_index):
    import urllib.error
    import urllib.request

    from amldist.retrieval.server import start_in_thread

    searcher = AsymmetricSearch(GalleryIndex.open(teacher_index), load_query_network(nets["student"]))
    with start_in_thread(searcher, max_upload=4096) as server:
        request = urllib.request.Request(f"{server.url}/search", data=b"\xff" * 10_000, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        reply = json.loads(refused.value.read())
    assert refused.value.code == 413 and "exceeds" in reply["error"] and "\n" not in reply["error"]
