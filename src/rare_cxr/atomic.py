"""Atomic file and folder writes, and the clean-up of what an interrupted write leaves behind.

Why this module: every output of the project (catalog files, the image cache, checkpoints, the
resume state, the phantom) must be either the old complete file or the new complete file, never
half of one, even after `kill -9`, a power cut or a full disk. The recipe is the classic one:
write a temporary file *in the destination's folder* (same filesystem, so the rename is atomic),
flush, `fsync`, `os.replace` onto the final name, `fsync` the folder. Python's `tempfile` and
fsspec's transactions do not fit: `tempfile.NamedTemporaryFile` does not fsync or rename, and
fsspec's local transaction writes into the system temp folder and *moves* across filesystems
(a copy, not atomic).

Temporary names carry the writing process's id: `.<name>.rare-cxr-tmp-<pid>-<token>` (files and
staging folders) and `.<name>.rare-cxr-old-<pid>-<token>` (a folder being swapped out). A
temporary whose process is gone is garbage; `sweep_leftovers` removes those at the next run and
never touches a live process's work.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

TEMP_TAG = ".rare-cxr-tmp-"
OLD_TAG = ".rare-cxr-old-"
LEFTOVER_PATTERN = re.compile(r"\.rare-cxr-(?:tmp|old)-(\d+)-[0-9a-f]+$")


def temporary_sibling(destination: str | os.PathLike, tag: str = TEMP_TAG) -> Path:
    """A fresh hidden name beside `destination` that `sweep_leftovers` recognises."""
    destination = Path(destination)
    return destination.with_name(f".{destination.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file of a freshly written folder, then the folder itself."""
    folder = Path(folder)
    for item in folder.iterdir():
        if item.is_file() and not item.is_symlink():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


class AtomicWriter(io.IOBase):
    """A writable file that appears at `destination` only when closed without an error.

    Used as `with AtomicWriter(path, "wb") as f: ...`: on a clean exit the data is flushed,
    fsynced and renamed into place; on an exception (including a full disk part-way) the
    temporary is deleted and `destination` is untouched. `exclusive=True` (mode "x") refuses to
    replace an existing file, as Kedro's versioned saves require.
    """

    def __init__(
        self,
        destination: str | os.PathLike,
        mode: str = "wb",
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> None:
        super().__init__()
        if not any(flag in mode for flag in "wx") or "+" in mode or "a" in mode:
            raise ValueError(f"AtomicWriter writes whole files (mode w or x), got {mode!r}")
        self.destination = Path(destination)
        self.exclusive = "x" in mode
        self.mode = mode.replace("x", "w")  # what pandas inspects to choose text or bytes
        # a folder created for this write (e.g. Kedro's `<name>/<version>/`) is removed again
        # if the write is discarded, so a failed save leaves no empty version behind
        self._created_parent = not self.destination.parent.exists()
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = temporary_sibling(self.destination)
        fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        binary = "b" in mode
        self._file: IO[Any] = os.fdopen(
            fd,
            "wb" if binary else "w",
            **({} if binary else {"encoding": encoding, "errors": errors, "newline": newline}),
        )
        self._done = False

    # -- the file API kedro-datasets, pandas, json and matplotlib use ------------------------

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def writelines(self, lines: Any) -> None:
        self._file.writelines(lines)

    def flush(self) -> None:
        if not self._done:
            self._file.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def name(self) -> str:
        return str(self.destination)

    # -- commit / discard --------------------------------------------------------------------

    def commit(self) -> None:
        """Flush, fsync and rename into place (idempotent)."""
        if self._done:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.exclusive:
                os.link(self.temporary, self.destination)  # fails if it exists
                os.unlink(self.temporary)
            else:
                os.replace(self.temporary, self.destination)
            fsync_dir(self.destination.parent)
        except BaseException:
            self.discard()
            raise
        self._done = True

    def discard(self) -> None:
        """Drop the temporary; the destination keeps whatever it held before."""
        if self._done:
            return
        self._done = True
        with suppress(OSError):
            self._file.close()
        self.temporary.unlink(missing_ok=True)
        if self._created_parent:
            with suppress(OSError):  # not empty (another writer), or already gone
                self.destination.parent.rmdir()

    def close(self) -> None:
        # A plain close() means "done writing": commit, like a normal file would persist.
        if not self._done:
            self.commit()
        super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
            super().close()

    def __del__(self) -> None:
        # Garbage-collected without close(): an abandoned write must not become the file.
        with suppress(Exception):  # at interpreter shutdown there is nothing to report to
            self.discard()


def write_atomic_bytes(destination: str | os.PathLike, payload: bytes) -> None:
    """Atomic write of a whole file from bytes."""
    with AtomicWriter(destination, "wb") as handle:
        handle.write(payload)


def write_atomic_text(destination: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomic write of a whole file from text."""
    with AtomicWriter(destination, "w", encoding=encoding) as handle:
        handle.write(text)


@contextmanager
def staging_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `final`; on success it replaces `final` atomically.

    Folders cannot be exchanged atomically everywhere, so an existing `final` is first renamed
    aside (`.rare-cxr-old-`) and deleted after the swap: a reader sees the old complete folder
    or the new complete folder. On an exception the staging folder is deleted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(final)
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`, moving an existing `final` aside first."""
    if final.exists():
        retired = temporary_sibling(final, OLD_TAG)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (a reused id errs on the safe side: kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_owner(path: Path) -> int | None:
    """The pid in a temporary's name, or None if `path` is not one of ours."""
    match = LEFTOVER_PATTERN.search(path.name)
    return int(match.group(1)) if match else None


def sweep_leftovers(root: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> list[Path]:
    """Remove temporaries of dead processes under `root`; return what was removed.

    A version folder (`<name>/<timestamp>/`) that held nothing but such a temporary is removed
    too, so no empty version is left for Kedro to trip on. Folders named in `skip` (absolute
    paths) are not descended into (e.g. a 112,120-image raw folder with nothing of ours).
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    skipped = {Path(s) for s in skip}
    for folder, subfolders, files in os.walk(root, topdown=True):
        here = Path(folder)
        for name in list(subfolders):
            path = here / name
            pid = leftover_owner(path)
            if path in skipped:
                subfolders.remove(name)
            elif pid is not None:
                subfolders.remove(name)
                if not pid_alive(pid):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        for name in files:
            path = here / name
            pid = leftover_owner(path)
            if pid is not None and not pid_alive(pid):
                path.unlink(missing_ok=True)
                removed.append(path)
    for path in removed:
        parent = path.parent
        if parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    for path in removed:
        logger.warning("removed %s, left by an interrupted write of a process that is gone", path)
    return removed
