"""Run a command so that file permissions apply to it, even when the tests run as root.

Root ignores permission bits through two capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH;
CAP_FOWNER lets it chmod anything). ``setpriv`` (util-linux) drops them from the bounding set
before exec, so the child, still uid 0, is held to the owner's bits like any user: a 0444 file
cannot be written, a 0555 folder cannot get new files. Not a test module.
"""

from __future__ import annotations

import os
import shutil

import pytest

DROP = "-dac_override,-dac_read_search,-fowner"


def unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` as is for a normal user; as root, wrapped in setpriv without the bypassing capabilities."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running the tests as root needs setpriv (util-linux) to test file permissions")
    return [setpriv, f"--bounding-set={DROP}", "--", *cmd]
