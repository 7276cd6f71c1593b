"""Files written whole: a reader (or a crash) never sees half a report, figure or export."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from knormctl.errors import KnormctlError, UsageError

# The machine failed, not the path given: the disk or quota is full, the device failed.
RUNTIME_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def write_error(path: Path, exc: OSError, what: str = "") -> KnormctlError:
    """One line for an OSError writing ``path``: a usage error (exit 2) for a path that cannot
    be written (read-only folder, a file where a folder should be), a runtime failure (exit 1)
    for a full disk or a failing device."""
    line = f"cannot write {what + ' ' if what else ''}{path}: {exc.strerror or exc}"
    return KnormctlError(line) if exc.errno in RUNTIME_ERRNOS else UsageError(line)


def _temporary(path: Path) -> Path:
    """'.NAME.PID.tmp' beside ``path``, NAME cut so the whole stays within a file system's 255
    bytes (a valid 250-character output name was refused: 'File name too long')."""
    name = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{name}.{os.getpid()}.tmp")


def refuse_the_database(path: Path, database: Path | None, what: str) -> None:
    """One line when ``path`` is the results database being read (``report -o`` replaced it), or
    one of SQLite's files beside it (its write-ahead log, shared memory or journal: replacing
    the log brought a deleted run back)."""
    if database is None:
        return
    if path.exists() and database.exists() and os.path.samefile(path, database):
        raise UsageError(f"{what} {path} is the results database being read; give another file")
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = database.with_name(database.name + suffix)
        if os.path.abspath(path) == os.path.abspath(sibling) or (
                path.exists() and sibling.exists() and os.path.samefile(path, sibling)):
            raise UsageError(f"{what} {path} is SQLite's {suffix[1:]} file of the results database; "
                             f"give another file")


@contextlib.contextmanager
def written_whole(path: Path, what: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; once written it replaces ``path`` in one
    step, so a reader never sees half a file. A symlink is followed (the file it names is
    replaced, not the link); a target that is not a regular file (/dev/null, /dev/stdout, a
    FIFO, a shell's >(...)) is written into directly: replacing it would destroy the device
    or the pipe. Any OSError becomes one line naming ``what`` (``--output``) and the path
    (``write_error``), and nothing is left behind; other errors pass through, the temporary
    file removed all the same."""
    try:
        special = os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        special = False
    if special:
        try:
            yield path
        except OSError as exc:
            raise write_error(path, exc, what) from None
        return
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    tmp = _temporary(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise write_error(path, exc, what) from None
    finally:
        with contextlib.suppress(OSError):  # where it could not be created, there is nothing to remove
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def written_together(paths: list[Path], what: str = "") -> Iterator[list[Path]]:
    """Temporary paths beside ``paths``; once every one is written they replace ``paths``, so a
    failure halfway (a full disk, a folder in a file's place) leaves none of them new: no set
    of figures mixes two runs. Errors as ``written_whole``."""
    tmps = [_temporary(p) for p in paths]
    try:
        yield tmps
        for path in paths:  # checked before the first rename: a folder in a file's place
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except OSError as exc:
        failed = Path(exc.filename) if exc.filename else paths[0]
        failed = next((p for p, t in zip(paths, tmps) if failed in (p, t)), failed)
        raise write_error(failed, exc, what) from None
    finally:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
