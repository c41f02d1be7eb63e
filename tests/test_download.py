"""`amldist data download` against a loopback HTTP server serving tiny stand-ins of the public files."""

import errno
import fcntl
import io
import os
import socket
import tarfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
from loopback_http import Served, serve
from PIL import Image

from amldist.cli.main import main
from amldist.datasets import archives, download, formats, urls
from amldist.errors import UserError

CIDS = [f"{i:029x}abc" for i in range(1, 7)]
OXFORD_ARCHIVE = {"oxbuild_images/all_souls_000001.jpg": 1, "oxbuild_images/deep/radcliffe_000002.jpg": 2,
                  "magdalen_000003.jpg": 3, "oxbuild_images/ashmolean_000004.jpg": 4}
PARIS_ARCHIVES = ({"paris/defense/paris_defense_000001.jpg": 5, "paris/eiffel/paris_eiffel_000002.jpg": 6},
                  {"paris/louvre/paris_louvre_000003.jpg": 7, "paris/general/paris_defense_000001.jpg": 8})
R1M_FILES = [f"{i % 7}/{i:06d}.jpg" for i in range(1, urls.REVISITOP1M_ARCHIVES + 1)]


@pytest.fixture
def server():
    with serve() as running:
        yield running


# ---------------------------------------------------------------- tiny public files ----------------------


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), ((seed * 37) % 256, (seed * 91) % 256, 50)).save(buffer, "JPEG")
    return buffer.getvalue()


def _tar_gz(members: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def _pickle_bytes(tmp_path: Path, writer, value) -> bytes:
    path = tmp_path / "scratch.pkl"
    writer(path, value)
    data = path.read_bytes()
    path.unlink()
    return data


def _ims_member(cid: str) -> str:
    return f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def publish_sfm(served: Served, tmp_path: Path) -> None:
    split = formats.SfmSplit
    db = {"train": split(CIDS[:4], np.array([0, 0, 1, 1]), np.array([0, 2]), np.array([1, 3])),
          "val": split(CIDS[4:], np.array([2, 2]), np.array([0]), np.array([1]))}
    served.put(urls.sfm_db_url("retrieval-SfM-120k"), _pickle_bytes(tmp_path, formats.write_sfm_db, db))
    for name, cids in (("retrieval-SfM-120k", CIDS), ("retrieval-SfM-30k", CIDS[:3])):
        whiten = formats.WhitenDb(cids, np.array([0]), np.array([1]))
        served.put(urls.sfm_whiten_url(name), _pickle_bytes(tmp_path, formats.write_whiten_db, whiten))
    served.put(urls.sfm_images_url(), _tar_gz({_ims_member(c): _jpeg(i) for i, c in enumerate(CIDS)}))


def _gnd(imlist: list[str], revisited: bool) -> formats.GroundTruth:
    relevant = {"easy": [1], "hard": [2], "junk": []} if revisited else {"ok": [1, 2], "junk": []}
    return formats.GroundTruth(imlist, [imlist[0]], [{"bbx": [0.0, 1.0, 5.0, 4.0], **relevant}])


def _names(archive: dict[str, int]) -> list[str]:
    return list(dict.fromkeys(Path(member).stem for member in archive))


def publish_test_sets(served: Served, tmp_path: Path, legacy: bool = False) -> None:
    paris = _names(PARIS_ARCHIVES[0]) + _names(PARIS_ARCHIVES[1])
    for name, imlist in (("oxford5k", _names(OXFORD_ARCHIVE)), ("roxford5k", _names(OXFORD_ARCHIVE)[:3]),
                         ("paris6k", list(dict.fromkeys(paris))), ("rparis6k", paris[:3])):
        gnd = _gnd(imlist, revisited=name.startswith("r"))
        served.put(urls.gnd_url(name), _pickle_bytes(tmp_path, formats.write_gnd, gnd))
    (oxford,) = urls.test_image_archive_urls("oxford5k", legacy)
    served.put(oxford, _tar_gz({m: _jpeg(s) for m, s in OXFORD_ARCHIVE.items()}))
    for url, archive in zip(urls.test_image_archive_urls("paris6k", legacy), PARIS_ARCHIVES):
        served.put(url, _tar_gz({m: _jpeg(s) for m, s in archive.items()}))


def publish_revisitop1m(served: Served) -> None:
    served.put(urls.revisitop1m_list_url(), ("\n".join(R1M_FILES) + "\n").encode())
    for url, member in zip(urls.revisitop1m_archive_urls(), R1M_FILES):
        served.put(url, _tar_gz({member: _jpeg(len(member))}))


def snapshot(root: Path) -> dict[str, object]:
    """Every file (-> mtime) and symlink (-> its target) under root, by relative path."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                entries[rel] = path.stat().st_mtime_ns
    return entries


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["data", "download", *argv])
    except SystemExit as exc:  # argparse rejects a malformed option before the command runs
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


FAST = download.DownloadOptions(retries=0, retry_delay_s=0.0, timeout_s=10.0)


def _options(base: str, **changes) -> download.DownloadOptions:
    return download.DownloadOptions(**{**FAST.__dict__, "base_url": base, **changes})


# ---------------------------------------------------------------- layout and idempotence -----------------


def test_every_dataset_lands_in_the_cirtorch_layout_and_rerun_is_a_no_op(server, tmp_path, capsys):
    base, served = server
    publish_sfm(served, tmp_path)
    publish_test_sets(served, tmp_path)
    publish_revisitop1m(served)
    root = tmp_path / "data"
    names = ["retrieval-SfM-120k", "roxford5k", "rparis6k", "oxford5k", "paris6k", "revisitop1m"]
    code, out, err = run_cli(capsys, *names, "--root", str(root), "--base-url", base, "--retries", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == names
    assert "train 4 images / 2 pairs, val 2 / 1, whiten 6 images (SfM-30k whiten 3)" in lines[0]
    assert "3 database images, 1 queries (revisited protocol)" in lines[1]
    assert "4 database images, 1 queries (old protocol)" in lines[3]
    assert "100 distractor images" in lines[5]

    layout_now = snapshot(root)
    expected = {"train/retrieval-SfM-120k/retrieval-SfM-120k.pkl",
                "train/retrieval-SfM-120k/retrieval-SfM-120k-whiten.pkl",
                "train/retrieval-SfM-30k/retrieval-SfM-30k-whiten.pkl", "train/retrieval-SfM-30k/ims",
                "datasets/revisitop1m/revisitop1m.txt", "test/roxford5k/jpg", "test/rparis6k/jpg"}
    expected |= {f"train/retrieval-SfM-120k/ims/{_ims_member(cid)}" for cid in CIDS}
    for name in ("oxford5k", "paris6k", "roxford5k", "rparis6k"):
        expected.add(f"test/{name}/gnd_{name}.pkl")
    expected |= {f"test/oxford5k/jpg/{n}.jpg" for n in _names(OXFORD_ARCHIVE)}
    expected |= {f"test/paris6k/jpg/{n}.jpg" for a in PARIS_ARCHIVES for n in _names(a)}
    expected |= {f"datasets/revisitop1m/jpg/{member}" for member in R1M_FILES}
    assert set(layout_now) == expected  # nothing more: no .part, staging folder or archive left
    assert layout_now["train/retrieval-SfM-30k/ims"] == "-> ../retrieval-SfM-120k/ims"
    assert layout_now["test/roxford5k/jpg"] == "-> ../oxford5k/jpg"
    assert layout_now["test/rparis6k/jpg"] == "-> ../paris6k/jpg"

    # Files carry the archive bytes; a name in both Paris archives keeps the first copy (cirtorch's mv -i).
    assert (root / "test/roxford5k/jpg/radcliffe_000002.jpg").read_bytes() == _jpeg(2)
    assert (root / "test/paris6k/jpg/paris_defense_000001.jpg").read_bytes() == _jpeg(5)
    assert (root / "train/retrieval-SfM-30k/ims" / _ims_member(CIDS[5])).read_bytes() == _jpeg(5)
    for dataset in ("retrieval-SfM-30k", "rparis6k", "revisitop1m"):
        assert all(r.path.is_file() for recs in formats.list_images(root, dataset).values() for r in recs)

    requests = {path: len(sent) for path, sent in served.sent.items()}
    code, out, _ = run_cli(capsys, *names, "--root", str(root), "--base-url", base)
    assert code == 0
    assert all(line.endswith("(nothing to download)") for line in out.splitlines())
    assert {path: len(sent) for path, sent in served.sent.items()} == requests
    assert snapshot(root) == layout_now


def test_keep_archives_and_legacy_archives(server, tmp_path):
    base, served = server
    publish_test_sets(served, tmp_path, legacy=True)
    root = tmp_path / "data"
    download.download("roxford5k", root, _options(base, legacy_archives=True, keep_archives=True))
    assert (root / "test/oxford5k/oxbuild_images.tgz").is_file()
    assert not list(root.rglob("*.part"))
    assert urlsplit(urls.LEGACY_TEST_IMAGE_ARCHIVES["oxford5k"][0]).path in served.sent
    assert (root / "test/roxford5k/jpg/magdalen_000003.jpg").read_bytes() == _jpeg(3)


def test_list_prints_names_and_public_urls(capsys):
    code, out, _ = run_cli(capsys, "--list")
    assert code == 0
    assert "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz" in out
    assert "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz" in out
    assert "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/rparis6k/gnd_rparis6k.pkl" in out
    assert "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{1..100}.tar.gz" in out
    assert [line for line in out.splitlines() if not line.startswith(" ")] == list(urls.DOWNLOADABLE)
    code, out, _ = run_cli(capsys, "--list", "--legacy-archives", "--base-url", "http://mirror:8/x/")
    assert "http://mirror:8/x/~vgg/data/parisbuildings/paris_2.tgz" in out
    assert "http://mirror:8/x/cnnimageretrieval/data/train/dbs/retrieval-SfM-30k-whiten.pkl" in out


# ---------------------------------------------------------------- resumable downloads --------------------


def _big_payload() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_dropped_connection_resumes_from_the_part_file(server, tmp_path):
    base, served = server
    data = _big_payload()
    path = served.put(urls.sfm_images_url(), data)
    url = urls.rebase(urls.sfm_images_url(), base)
    dest = tmp_path / "ims.tar.gz"
    served.drop_after[path] = 120_000
    with pytest.raises(UserError, match="120000 of 300000"):
        download.fetch(url, dest, FAST)
    assert not dest.exists() and (tmp_path / "ims.tar.gz.part").stat().st_size == 120_000

    assert download.fetch(url, dest, FAST) == len(data) - 120_000
    assert dest.read_bytes() == data and not (tmp_path / "ims.tar.gz.part").exists()
    assert served.ranges[path] == [None, "bytes=120000-"]
    assert served.sent[path][-1] == len(data) - 120_000 < len(data)


def test_retry_within_one_call_resumes(server, tmp_path):
    base, served = server
    data = _big_payload()
    path = served.put(urls.gnd_url("oxford5k"), data)
    served.drop_after[path] = 50_000
    dest = tmp_path / "file.bin"
    assert download.fetch(urls.rebase(urls.gnd_url("oxford5k"), base), dest,
                          _options(None, retries=2)) == len(data)
    assert dest.read_bytes() == data
    assert served.sent[path] == [50_000, len(data) - 50_000]


@pytest.mark.parametrize("part_bytes", [b"x" * 1000, b"y" * 300_001])
def test_server_ignoring_range_or_refusing_it_restarts_cleanly(server, tmp_path, part_bytes):
    base, served = server
    data = _big_payload()
    path = served.put(urls.sfm_images_url(), data)
    served.ignore_range = len(part_bytes) < len(data)  # else the server answers 416 (range past the end)
    dest = tmp_path / "ims.tar.gz"
    (tmp_path / "ims.tar.gz.part").write_bytes(part_bytes)
    assert download.fetch(urls.rebase(urls.sfm_images_url(), base), dest, FAST) == len(data)
    assert dest.read_bytes() == data
    assert served.sent[path] == [len(data)]


def test_a_whole_part_file_is_finished_without_downloading_again(server, tmp_path):
    base, served = server
    data = _big_payload()
    path = served.put(urls.sfm_images_url(), data)
    (tmp_path / "ims.tar.gz.part").write_bytes(data)  # killed between the last byte and the rename
    assert download.fetch(urls.rebase(urls.sfm_images_url(), base), tmp_path / "ims.tar.gz", FAST) == 0
    assert (tmp_path / "ims.tar.gz").read_bytes() == data
    assert served.ranges[path] == [f"bytes={len(data)}-"] and not served.sent[path]


# ---------------------------------------------------------------- atomic and safe extraction -------------


def test_killed_extraction_never_leaves_a_final_folder_and_resumes(server, tmp_path, monkeypatch):
    base, served = server
    publish_test_sets(served, tmp_path)
    root = tmp_path / "data"
    real_extract = archives.extract_archive

    def killed_on_second_archive(archive, dest):
        if archive.name.startswith("paris_2"):
            real_extract(archive, dest)
            raise KeyboardInterrupt  # as if killed mid-way, after writing files
        return real_extract(archive, dest)

    monkeypatch.setattr(archives, "extract_archive", killed_on_second_archive)
    with pytest.raises(KeyboardInterrupt):
        download.download("paris6k", root, _options(base))
    jpg = root / "test/paris6k/jpg"
    assert not jpg.exists()
    assert not list(jpg.parent.glob(".jpg.extract-*"))  # the scratch folder went away
    (jpg.parent / ".jpg.extract-leftover").mkdir()  # and one from a SIGKILL is cleaned up next time

    monkeypatch.setattr(archives, "extract_archive", real_extract)
    paris_1 = urlsplit(urls.TEST_IMAGE_ARCHIVES["paris6k"][0]).path
    paris_2 = urlsplit(urls.TEST_IMAGE_ARCHIVES["paris6k"][1]).path
    download.download("paris6k", root, _options(base))
    assert sorted(p.name for p in jpg.iterdir()) == \
        sorted({f"{n}.jpg" for a in PARIS_ARCHIVES for n in _names(a)})
    assert len(served.sent[paris_1]) == 1  # its files were already staged: not fetched again
    assert len(served.sent[paris_2]) == 1  # downloaded once, kept until its extraction succeeded
    assert sorted(p.name for p in jpg.parent.iterdir()) == ["gnd_paris6k.pkl", "jpg"]


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("bad, message", [
    (_member("../evil.jpg"), "'..'"),
    (_member("a/../../evil.jpg"), "'..'"),
    (_member("/tmp/evil.jpg"), "absolute"),
    (_member("link", tarfile.SYMTYPE, "../../etc/passwd"), "symlink"),
    (_member("deep/link", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
    (_member("hard", tarfile.LNKTYPE, "../outside"), "hard link"),
    (_member("dev", tarfile.CHRTYPE), "device"),
])
def test_unsafe_members_are_refused_before_anything_escapes(tmp_path, bad, message):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_tar_gz({"ok/first.jpg": b"1"}, extra=(bad,)))
    dest = tmp_path / "box" / "inner"
    dest.mkdir(parents=True)
    with pytest.raises(UserError, match=message):
        archives.extract_archive(archive, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "box"]
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["inner"]


def test_links_inside_the_archive_are_allowed(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(_tar_gz({"a/x.jpg": b"x"},
                                extra=(_member("a/b/y.jpg", tarfile.SYMTYPE, "../x.jpg"),)))
    assert archives.extract_archive(archive, tmp_path / "out") == 1
    assert (tmp_path / "out/a/b/y.jpg").read_bytes() == b"x"


def test_archive_with_dot_dot_member_is_refused_end_to_end(server, tmp_path, capsys):
    base, served = server
    publish_test_sets(served, tmp_path)
    served.put(urls.TEST_IMAGE_ARCHIVES["oxford5k"][0],
               _tar_gz({"ok.jpg": _jpeg(1), "../evil.jpg": _jpeg(2)}))
    root = tmp_path / "data"
    code, _, err = run_cli(capsys, "oxford5k", "--root", str(root), "--base-url", base)
    assert code == 2 and err.count("\n") == 1 and "'..'" in err
    assert not (root / "test/oxford5k/jpg").exists()
    assert not list(tmp_path.rglob("evil.jpg"))


# ---------------------------------------------------------------- user errors ----------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("amldist") and "Traceback" not in err
    return err


def test_cli_usage_errors(tmp_path, capsys):
    assert "unknown dataset 'nope'" in _cli_error(capsys, "nope", "--root", str(tmp_path))
    assert "--root" in _cli_error(capsys, "oxford5k")
    assert "at least one dataset" in _cli_error(capsys, "--root", str(tmp_path))
    assert "--base-url" in _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", "ftp://x")
    assert "must be >= 0" in _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--retries", "-1")


def test_unreachable_host_and_http_404(server, tmp_path, capsys):
    base, _ = server
    unreachable = f"http://127.0.0.1:{_closed_port()}"
    err = _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", unreachable, "--retries", "0")
    assert "cannot reach 127.0.0.1" in err
    err = _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", base)
    assert "HTTP 404" in err and "gnd_oxford5k.pkl" in err


def test_corrupt_archive_and_corrupt_pickle(server, tmp_path, capsys):
    base, served = server
    publish_test_sets(served, tmp_path)
    served.put(urls.TEST_IMAGE_ARCHIVES["oxford5k"][0], b"not a tar archive at all" * 10)
    err = _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", base)
    assert "corrupt archive" in err and "oxbuild_images-v1.tgz" in err
    assert not (tmp_path / "test/oxford5k/jpg").exists()

    whole = _tar_gz({m: _big_payload()[:20_000] + bytes([s]) for m, s in OXFORD_ARCHIVE.items()})
    served.put(urls.TEST_IMAGE_ARCHIVES["oxford5k"][0], whole[: len(whole) // 2])  # a truncated gzip stream
    (tmp_path / "test/oxford5k/oxbuild_images-v1.tgz").unlink()
    err = _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", base)
    assert "corrupt archive" in err
    assert not (tmp_path / "test/oxford5k/jpg").exists()
    assert not list((tmp_path / "test/oxford5k").glob(".jpg.*"))

    served.put(urls.gnd_url("paris6k"), b"\x80\x04garbage")
    err = _cli_error(capsys, "paris6k", "--root", str(tmp_path), "--base-url", base)
    assert "not valid" in err
    assert not list((tmp_path / "test/paris6k").glob("gnd_paris6k.pkl*"))  # neither kept nor half-kept


def test_no_space_left(server, tmp_path, capsys, monkeypatch):
    base, served = server
    publish_test_sets(served, tmp_path)
    monkeypatch.setattr(download.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=100, used=90, free=10))
    assert "not enough free space" in _cli_error(capsys, "oxford5k", "--root", str(tmp_path),
                                                 "--base-url", base)
    monkeypatch.undo()

    def full_disk(archive, dest):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(archives, "extract_archive", full_disk)
    assert "no space left" in _cli_error(capsys, "oxford5k", "--root", str(tmp_path), "--base-url", base)
    assert not (tmp_path / "test/oxford5k/jpg").exists()


def test_images_missing_from_the_archive_are_reported(server, tmp_path):
    base, served = server
    publish_test_sets(served, tmp_path)
    gnd = _gnd(_names(OXFORD_ARCHIVE) + ["not_in_archive"], revisited=False)
    served.put(urls.gnd_url("oxford5k"), _pickle_bytes(tmp_path, formats.write_gnd, gnd))
    with pytest.raises(UserError, match="1 of 5 listed images are missing.*remove it and rerun"):
        download.download("oxford5k", tmp_path / "data", _options(base))


def test_a_half_filled_folder_from_another_tool_is_reported_not_trusted(server, tmp_path):
    base, served = server
    publish_test_sets(served, tmp_path)
    jpg = tmp_path / "test/paris6k/jpg"  # cirtorch creates jpg/ first, then fills it
    jpg.mkdir(parents=True)
    (jpg / "paris_defense_000001.jpg").write_bytes(_jpeg(1))
    with pytest.raises(UserError, match=f"2 of 3 listed images are missing.*if {jpg} is incomplete"):
        download.download("paris6k", tmp_path, _options(base))
    assert sorted(p.name for p in jpg.iterdir()) == ["paris_defense_000001.jpg"]  # left as it was


def test_a_second_concurrent_run_is_refused(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another amldist download"):
            download.download("oxford5k", tmp_path, FAST)
    finally:
        os.close(fd)
