"""Files written whole: a reader (or a crash) never sees half a report, figure or export."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from knormctl.errors import UsageError


@contextlib.contextmanager
def written_whole(path: Path, what: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; once written it replaces ``path`` in one
    step, so a reader never sees half a file. Any OSError (a read-only folder, a file where a
    folder should be) becomes one line naming ``what`` (``--output``) and the path, and nothing
    is left behind; other errors pass through, the temporary file removed all the same."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {what + ' ' if what else ''}{path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):  # where it could not be created, there is nothing to remove
            tmp.unlink(missing_ok=True)
