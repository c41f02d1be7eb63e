"""Safe, atomic extraction of dataset archives into their final folder.

A folder is built in a hidden staging folder beside it, one archive at a time (a sidecar JSON
records which archives are already in), and renamed onto its final name only when every archive
is in. A run killed at any point therefore never leaves a half-filled folder under the final
name, and the next run carries on from the last archive it finished.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from amldist.atomic import atomic_write_json
from amldist.errors import UserError

log = logging.getLogger(__name__)


def _escapes(relative: str) -> bool:
    """True when a path, relative to the archive root, leaves it ('..' first) or is absolute."""
    normal = posixpath.normpath(relative)
    return normal.startswith(("/", "../")) or normal == ".."


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Raise UserError for a member that could write outside the extraction folder."""
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or name[1:3] in (":/", ":\\"):
        raise UserError(f"{archive}: refusing member with an absolute path: {name}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise UserError(f"{archive}: refusing member with '..' in its path: {name}")
    if member.issym() and _escapes(posixpath.join(posixpath.dirname(name), member.linkname)):
        raise UserError(f"{archive}: refusing symlink {name} -> {member.linkname} "
                        "(leaves the archive folder)")
    if member.islnk() and _escapes(member.linkname):
        raise UserError(f"{archive}: refusing hard link {name} -> {member.linkname} "
                        "(leaves the archive folder)")
    if member.ischr() or member.isblk() or member.isfifo():
        raise UserError(f"{archive}: refusing device or pipe member {name}")


def extract_archive(archive: Path, dest: Path) -> int:
    """Extract a tar(.gz) archive into the folder `dest`, checking every member first; returns #files."""
    files = 0

    def checked(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        nonlocal files
        for member in tar:  # streamed: each member is checked before anything of it is written
            check_member(member, archive)
            files += member.isfile()
            yield member

    opened = False
    try:
        with tarfile.open(archive, "r:*") as tar:
            opened = True
            # The 'data' filter re-checks paths and links and drops special permission bits.
            tar.extractall(dest, members=checked(tar), filter="data")
    except tarfile.FilterError as err:
        raise UserError(f"{archive}: refusing unsafe member ({_one_line(err)})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        reason = _one_line(err) if opened else "not a tar or tar.gz file"
        raise UserError(f"corrupt archive {archive} ({reason}); delete it and rerun") from None
    return files


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def move_files(source: Path, dest: Path, flatten: bool) -> tuple[int, int]:
    """Move the files under `source` into `dest`, flat or keeping sub-folders; returns (moved, duplicates).

    A name already present in `dest` is kept and the new copy dropped (cirtorch's `mv -i` does the
    same); with `flatten`, only regular files move, as cirtorch's `find -type f`.
    """
    moved = duplicates = 0
    for folder, _, names in os.walk(source):
        for name in names:
            path = Path(folder) / name
            if flatten and (path.is_symlink() or not path.is_file()):
                continue
            target = dest / (name if flatten else path.relative_to(source))
            if target.exists() or target.is_symlink():
                duplicates += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)  # same file system: a rename, no copy
            moved += 1
    return moved, duplicates


class StagedFolder:
    """Builds `target` from archives in a hidden `.NAME.staging` folder beside it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.staging = target.parent / f".{target.name}.staging"
        self.record = target.parent / f".{target.name}.staging.json"

    def complete(self) -> bool:
        return self.target.is_dir()

    def begin(self, archive_names: Sequence[str]) -> set[str]:
        """Drop leftovers of killed runs; return the archives a previous run already moved in."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in self.target.parent.glob(f".{self.target.name}.extract-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        done = set(self._read_record())
        if not done or done - set(archive_names) or not self.staging.is_dir():
            # Nothing recorded yet (a killed first archive), other archives (--legacy-archives changed),
            # or a record that outlived its folder: start from an empty staging folder.
            if self.staging.exists():
                log.info("discarding a stale staging folder %s", self.staging)
            self._reset()
            return set()
        return done

    def add(self, archive: Path, flatten: bool) -> None:
        """Extract `archive` beside the target and move its files into the staging folder."""
        scratch = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.extract-", dir=self.target.parent))
        try:
            files = extract_archive(archive, scratch)
            if not flatten and not self.staging.exists():
                os.rename(scratch, self.staging)  # first archive of a tree: one rename
                duplicates = 0
            else:
                self.staging.mkdir(exist_ok=True)
                _, duplicates = move_files(scratch, self.staging, flatten)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if duplicates:
            log.warning("%s: kept the first copy of %d duplicate file name(s)", archive.name, duplicates)
        log.info("extracted %d files from %s", files, archive.name)
        atomic_write_json(self.record, sorted(set(self._read_record()) | {archive.name}))

    def finish(self) -> None:
        """Rename the staging folder onto the target (all archives are in)."""
        self.staging.mkdir(exist_ok=True)
        os.rename(self.staging, self.target)
        self.record.unlink(missing_ok=True)

    def _read_record(self) -> list[str]:
        try:
            names = json.loads(self.record.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [str(n) for n in names] if isinstance(names, list) else []

    def _reset(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.record.unlink(missing_ok=True)
