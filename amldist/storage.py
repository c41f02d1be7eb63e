"""Where data and runs live: a local (or shared) folder, or an object-store URI (s3://, gs://, ...).

Every location is a string; `is_uri` tells the two kinds apart. Object stores are reached through
pyarrow's filesystems (the same ones Ray Train writes checkpoints with), so one set of settings serves
the shards, the teacher feature store and the run storage:

- credentials: the standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN`), `~/.aws/credentials`, or the instance's role; gs:// uses Google's defaults;
- the S3 endpoint of a non-AWS store (MinIO, Ceph, a loopback test server): `AWS_ENDPOINT_URL_S3` or
  `AWS_ENDPOINT_URL` (the AWS SDKs' own variables), e.g. `http://127.0.0.1:9000`;
- the region: `AWS_REGION` or `AWS_DEFAULT_REGION`.

Three ways to get samples out of a store (docs/SCALING.md measures them): stream whole shards
(`open_stream`, what WebDataset does), copy them once to a node-local cache checked against their
manifest (`amldist.node_cache`), or read single samples by byte range (`open_ranged`).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from amldist.errors import UserError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
COPY_CHUNK = 8 << 20  # bytes per read when copying between filesystems


def is_uri(location: str | os.PathLike | None) -> bool:
    """True for `scheme://...` other than file://; plain paths (a shared mount too) are local."""
    if location is None:
        return False
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a non-URI location (file:// is stripped)."""
    text = str(location)
    return Path(text.removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` with forward slashes for a URI, the OS's rules for a path."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(local_path(base).joinpath(*parts))


def endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(location: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) of a location. s3:// honours the endpoint variables."""
    import pyarrow
    import pyarrow.fs as pafs

    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(local_path(text).expanduser().resolve())
    parsed = urlparse(text)
    try:
        if parsed.scheme == "s3" and endpoint():
            region = next((os.environ[n] for n in REGION_VARIABLES if os.environ.get(n)), None)
            fs = pafs.S3FileSystem(endpoint_override=endpoint(), region=region)
            return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot open the storage {text}: {reason}") from None


def _info(location: str):
    fs, path = filesystem(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return local_path(location).expanduser().exists()
    import pyarrow.fs as pafs

    return _info(str(location))[2].type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return local_path(location).expanduser().is_file()
    import pyarrow.fs as pafs

    return _info(str(location))[2].type == pafs.FileType.File


def file_size(location: str | os.PathLike) -> int:
    """Bytes of a file; FileNotFoundError when it is not there."""
    if not is_uri(location):
        return local_path(location).expanduser().stat().st_size
    import pyarrow.fs as pafs

    info = _info(str(location))[2]
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(str(location))
    return int(info.size)


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return local_path(location).expanduser().read_bytes()
    import pyarrow

    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except (pyarrow.ArrowException, OSError) as err:
        raise FileNotFoundError(f"{location}: {err}") from None


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


def open_stream(location: str | os.PathLike):
    """A sequential binary stream of a file (a local file object, or pyarrow's input stream).

    A store's stream is buffered: unbuffered, each small read (tarfile reads 10 KB at a time) would
    be a GET of its own."""
    if not is_uri(location):
        return open(local_path(location).expanduser(), "rb")
    fs, path = filesystem(location)
    return fs.open_input_stream(path, buffer_size=COPY_CHUNK)


def open_ranged(location: str | os.PathLike):
    """A random-access file of a store: `.read_at(size, offset)` is one ranged GET."""
    fs, path = filesystem(location)
    return fs.open_input_file(path)


def list_files(location: str | os.PathLike, recursive: bool = True) -> dict[str, int]:
    """{path relative to `location` (forward slashes): size} of the files under a folder."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return {posixpath.relpath(i.path, root): int(i.size) for i in infos if i.type == pafs.FileType.File}


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Copy one file between any two locations (streamed); returns its bytes."""
    src_fs, src_path = filesystem(source)
    dst_fs, dst_path = filesystem(target)
    if not is_uri(target):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with src_fs.open_input_stream(src_path) as reader, dst_fs.open_output_stream(dst_path) as writer:
        while block := reader.read(COPY_CHUNK):
            writer.write(block)
            copied += len(block)
    return copied


def upload_tree(local_dir: str | os.PathLike, target: str, workers: int = 8) -> tuple[int, int]:
    """Copy every file under `local_dir` to the same relative paths under `target` (a single file: to
    `target`); returns (files, bytes).

    A folder's manifest.json goes after the other files of its folder, so a reader that finds the
    manifest finds what it names (readers treat the manifest as the commit point, as on disk).
    """
    from concurrent.futures import ThreadPoolExecutor

    root = local_path(local_dir).expanduser()
    if root.is_file():  # one file: to `target` itself
        return 1, copy_file(root, target)
    if not root.is_dir():
        raise UserError(f"{local_dir} is neither a folder nor a file")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifests = [p for p in files if p.name == "manifest.json"]
    others = [p for p in files if p.name != "manifest.json"]
    total = 0
    for batch in (others, manifests):
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            total += sum(pool.map(lambda p: copy_file(p, join(target, *p.relative_to(root).parts)), batch))
    return len(files), total


def storage_filesystem(location: str | os.PathLike):
    """Ray Train's `RunConfig(storage_filesystem=...)` for run storage at `location`: the pyarrow
    filesystem of a URI (with the endpoint settings above), None for a local or shared folder."""
    return filesystem(location)[0] if is_uri(location) else None


def storage_filesystem_path(location: str | os.PathLike) -> str:
    """The matching `RunConfig(storage_path=...)`: the path inside `storage_filesystem(location)`."""
    return filesystem(location)[1] if is_uri(location) else str(local_path(location).expanduser().resolve())
