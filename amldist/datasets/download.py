"""Download the real datasets into cirtorch's on-disk layout: resumable, atomic, verified.

- Files arrive in `NAME.part` and are renamed onto `NAME` only once complete and (for pickles)
  parsed; an interrupted download resumes with an HTTP Range request.
- Image archives go through `archives.StagedFolder`: a folder appears under its final name only
  when every archive is extracted into it (safely: no absolute paths, '..' or escaping links).
- A rerun skips whatever is complete; the data root is locked so two runs cannot interleave.
- Only the standard library talks HTTP (urllib), so this adds no dependency.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from amldist.datasets import formats, layout, urls
from amldist.datasets.archives import StagedFolder
from amldist.errors import UserError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = "amldist-download/1 (+python-urllib)"
SFM120K, SFM30K = layout.TRAIN_DATASETS


@dataclass(frozen=True)
class DownloadOptions:
    base_url: str | None = None  # replaces scheme://host of every public URL (a mirror, a test server)
    legacy_archives: bool = False  # aml's original Oxford/Paris archives instead of the face-blurred ones
    keep_archives: bool = False  # keep image archives beside their folder after extraction
    retries: int = 5  # extra attempts after a dropped connection, a timeout or an HTTP 5xx
    retry_delay_s: float = 2.0  # doubled after each failed attempt
    timeout_s: float = 60.0  # socket timeout of one request


class _Transient(Exception):
    """A failure worth another attempt (the .part file keeps what arrived)."""

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received  # bytes this attempt wrote before failing


def progress_disabled() -> bool:
    return os.environ.get("AMLDIST_NO_PROGRESS") == "1" or not sys.stderr.isatty()


# ---------------------------------------------------------------- HTTP ----------------------------------


def fetch(url: str, dest: Path, options: DownloadOptions = DownloadOptions(),
          verify: Callable[[Path], object] | None = None) -> int:
    """Download `url` to `dest` (resuming `dest.part`); returns the bytes transferred by this call.

    An existing `dest` counts as complete. `verify(part)` runs on the finished download before it
    is renamed into place; a UserError there deletes the download.
    """
    dest = Path(dest)
    if dest.exists():
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    transferred = 0
    for attempt in range(options.retries + 1):
        try:
            transferred += _fetch_once(url, part, options.timeout_s)
            break
        except _Transient as err:
            transferred += err.received
            if attempt == options.retries:
                raise UserError(f"cannot download {url}: {err}") from None
            delay = options.retry_delay_s * 2 ** attempt
            log.warning("%s: %s; retrying in %.0f s", dest.name, err, delay)
            time.sleep(delay)
    _check_download(url, part, verify)
    os.replace(part, dest)
    return transferred


def _check_download(url: str, part: Path, verify: Callable[[Path], object] | None) -> None:
    with open(part, "rb") as handle:
        os.fsync(handle.fileno())
    if verify is None:
        return
    try:
        verify(part)
    except UserError as err:
        part.unlink()
        raise UserError(f"the file downloaded from {url} is not valid: {err}") from None


def _fetch_once(url: str, part: Path, timeout_s: float) -> int:
    have = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urlopen(request, timeout=timeout_s)
    except HTTPError as err:
        err.close()
        if err.code == 416 and have:
            return _after_refused_range(url, part, have, err.headers.get("Content-Range", ""), timeout_s)
        if err.code >= 500 or err.code in (408, 429):
            raise _Transient(f"HTTP {err.code} {err.reason}") from None
        raise UserError(f"HTTP {err.code} {err.reason} for {url}") from None
    except URLError as err:
        raise _Transient(f"cannot reach {urlsplit(url).netloc} ({err.reason})") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _Transient(f"{type(err).__name__} while connecting") from None
    with response:
        start, total = _resume_point(response, have, part)
        return _write_body(response, part, start, total)


def _after_refused_range(url: str, part: Path, have: int, content_range: str, timeout_s: float) -> int:
    """HTTP 416 to `Range: bytes=have-`: the .part is already whole (killed before its rename), or too
    long."""
    match = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
    if match and int(match.group(1)) == have:
        return 0
    log.info("%s: server refused to resume; restarting", part.name)
    part.unlink()
    return _fetch_once(url, part, timeout_s)


def _resume_point(response, have: int, part: Path) -> tuple[int, int | None]:
    """(offset the body starts at, full size or None) from a 200 or 206 response."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != have:
            part.unlink()  # a range we did not ask for: the bytes cannot be appended
            raise _Transient("server answered a different byte range; restarting")
        return have, None if match.group(2) == "*" else int(match.group(2))
    if have:
        log.info("%s: server ignores Range requests; restarting from 0", part.name)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _write_body(response, part: Path, start: int, total: int | None) -> int:
    if total is not None:
        _check_free_space(part.parent, total - start)
    received = 0
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name[:-len(".part")], disable=progress_disabled(), leave=False)
    with bar, open(part, "ab" if start else "wb") as out:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                raise _Transient(f"{type(err).__name__} after {start + received} bytes", received) from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    size = start + received
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise _Transient(f"connection closed after {size} of {total} bytes", received)
    return received


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"not enough free space in {folder}: need {_size(needed)}, {_size(free)} free")


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- install steps ------------------------


def _fetch_file(url: str, dest: Path, options: DownloadOptions, verify: Callable[[Path], object]) -> int:
    if dest.exists():
        verify(dest)  # cheap, and catches a damaged file left from an older run
        log.info("%s: already here", dest.name)
        return 0
    source = urls.rebase(url, options.base_url)
    log.info("downloading %s", source)
    return fetch(source, dest, options, verify)


def _install_archives(archive_urls: tuple[str, ...], target: Path, flatten: bool,
                      options: DownloadOptions) -> int:
    """Fill folder `target` from archives (downloaded beside it), atomically; skip if it exists."""
    folder = StagedFolder(target)
    if folder.complete():
        log.info("%s: already here", target)
        return 0
    names = [Path(urlsplit(url).path).name for url in archive_urls]
    done = folder.begin(names)
    fetched = 0
    bar = tqdm(total=len(names), initial=len(done), unit="archive", desc=target.name,
               disable=progress_disabled() or len(names) == 1)
    with bar:
        for index, (url, name) in enumerate(zip(archive_urls, names)):
            if name in done:
                continue
            archive, source = target.parent / name, urls.rebase(url, options.base_url)
            log.info("archive %d/%d: %s", index + 1, len(names), source)
            fetched += fetch(source, archive, options)
            # JPEGs barely compress: extracting needs about the archive's size again.
            _check_free_space(target.parent, archive.stat().st_size)
            folder.add(archive, flatten)
            if not options.keep_archives:
                archive.unlink()
            bar.update(1)
    folder.finish()
    return fetched


def _link(link: Path, points_to: Path) -> None:
    """Relative symlink `link` -> `points_to` (cirtorch's shared image folders); keeps an existing entry."""
    if link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    temp = link.with_name(f".{link.name}.link.tmp")
    temp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(points_to, link.parent), temp)
    os.replace(temp, link)  # also replaces a dangling link left by an older layout


def _install_train(name: str, root: Path, options: DownloadOptions) -> int:
    fetched = _fetch_file(urls.sfm_db_url(SFM120K), layout.train_db_path(root, SFM120K), options,
                          formats.read_sfm_db)
    for whiten_name in (SFM120K, SFM30K):
        fetched += _fetch_file(urls.sfm_whiten_url(whiten_name), layout.whiten_db_path(root, whiten_name),
                               options, formats.read_whiten_db)
    ims = layout.train_images_dir(root, SFM120K)
    fetched += _install_archives((urls.sfm_images_url(),), ims, False, options)
    _link(layout.train_images_link(root, SFM30K), ims)
    return fetched


def _install_test(name: str, root: Path, options: DownloadOptions) -> int:
    fetched = _fetch_file(urls.gnd_url(name), layout.gnd_path(root, name), options, formats.read_gnd)
    owner = layout.test_images_owner(name)
    archives = urls.test_image_archive_urls(name, options.legacy_archives)
    fetched += _install_archives(archives, layout.test_images_dir(root, owner), True, options)
    if owner != name:
        _link(layout.test_images_dir(root, name), layout.test_images_dir(root, owner))
    return fetched


def _install_distractors(name: str, root: Path, options: DownloadOptions) -> int:
    fetched = _fetch_file(urls.revisitop1m_list_url(), layout.distractor_list_path(root, name), options,
                          _read_image_list)
    fetched += _install_archives(urls.revisitop1m_archive_urls(), layout.distractor_images_dir(root, name),
                                 False, options)
    return fetched


def _read_image_list(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text list of image paths") from None
    names = [line for line in lines if line]
    if not names or any(name.startswith("/") or ".." in Path(name).parts for name in names):
        raise UserError(f"{path}: expected one relative image path per line")
    return names


# ---------------------------------------------------------------- verification ------------------------


def _require_images(dataset: str, paths: set[Path], folder: Path) -> None:
    missing = sorted(p for p in paths if not p.is_file())
    if missing:
        # Typically a folder left half-filled by another tool (cirtorch creates it before extracting).
        raise UserError(f"{dataset}: {len(missing)} of {len(paths)} listed images are missing "
                        f"(first: {missing[0]}); if {folder} is incomplete, remove it and rerun")


def _verify_train(name: str, root: Path) -> str:
    listed = {s: formats.list_images(root, s) for s in (SFM120K, SFM30K)}
    _require_images(SFM120K, {r.path for splits in listed.values() for recs in splits.values() for r in recs},
                    layout.train_images_dir(root, SFM120K))
    if not layout.train_images_link(root, SFM30K).is_dir():
        raise UserError(f"{layout.train_images_link(root, SFM30K)} is not a folder or a link to one")
    db = formats.read_sfm_db(layout.train_db_path(root, SFM120K))
    return (f"train {len(db['train'])} images / {len(db['train'].qidxs)} pairs, "
            f"val {len(db['val'])} / {len(db['val'].qidxs)}, whiten {len(listed[SFM120K]['whiten'])} images "
            f"(SfM-30k whiten {len(listed[SFM30K]['whiten'])}) in {layout.train_dir(root, SFM120K)}")


def _verify_test(name: str, root: Path) -> str:
    splits = formats.list_images(root, name)
    _require_images(name, {r.path for recs in splits.values() for r in recs},
                    layout.test_images_dir(root, layout.test_images_owner(name)))
    protocol = formats.read_gnd(layout.gnd_path(root, name)).protocol
    return (f"{len(splits['db'])} database images, {len(splits['query'])} queries ({protocol} protocol) "
            f"in {layout.test_dir(root, name)}")


def _verify_distractors(name: str, root: Path) -> str:
    images = formats.list_images(root, name)["db"]
    _require_images(name, {r.path for r in images}, layout.distractor_images_dir(root, name))
    return f"{len(images)} distractor images in {layout.distractor_dir(root, name)}"


_STEPS = {
    "train": (_install_train, _verify_train),
    "test": (_install_test, _verify_test),
    "distractors": (_install_distractors, _verify_distractors),
}


# ---------------------------------------------------------------- entry points ------------------------


def download(name: str, root: str | Path, options: DownloadOptions = DownloadOptions()) -> str:
    """Fetch, extract and verify dataset `name` under `root` (cirtorch layout); returns a one-line summary."""
    layout.check_dataset(name, urls.DOWNLOADABLE)
    if options.base_url is not None:
        urls.check_base_url(options.base_url)
    root = Path(root).expanduser()
    with _disk_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            install, verify = _STEPS[layout.dataset_kind(name)]
            fetched = install(name, root, options)
            summary = verify(name, root)
    news = f"downloaded {_size(fetched)}" if fetched else "nothing to download"
    return f"{name}: ok, {summary} ({news})"


def list_urls(options: DownloadOptions = DownloadOptions()) -> dict[str, tuple[str, ...]]:
    """Every downloadable name and the URLs it fetches (after `--base-url`, `--legacy-archives`)."""
    return {name: tuple(urls.rebase(u, options.base_url)
                        for u in urls.dataset_urls(name, options.legacy_archives))
            for name in urls.DOWNLOADABLE}


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data root folder itself (no lock file left behind)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another amldist download is running in {root}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def _disk_errors(root: Path) -> Iterator[None]:
    """File-system failures (full disk, permissions) become one-line UserErrors."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device holding {root}; free some and rerun") from None
        where = f": {err.filename}" if err.filename else ""
        raise UserError(f"{err.strerror or err}{where}") from None
