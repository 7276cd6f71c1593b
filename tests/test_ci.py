"""CI must not pass with the PostgreSQL store tests skipped (issue 11, item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_fails_instead_of_skipping_when_the_postgresql_tests_cannot_run():
    """scripts/test.sh sets KNORMCTL_REQUIRE_PG=1: a PostgreSQL test without a server is then a
    failure with its reason, not a skip (issue 11: CI passed with them skipped)."""
    test = f"{REPO / 'tests' / 'test_store.py'}::test_listing_runs[postgresql]"
    env = {k: v for k, v in os.environ.items() if k != "KNORMCTL_TEST_PG_URL"}
    required = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                              env=env | {"KNORMCTL_REQUIRE_PG": "1"}, cwd=REPO, capture_output=True, text=True)
    assert required.returncode == 1, required.stdout
    assert "KNORMCTL_REQUIRE_PG is set but KNORMCTL_TEST_PG_URL is not" in required.stdout
    optional = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                              env=env | {"KNORMCTL_REQUIRE_PG": "0"}, cwd=REPO, capture_output=True, text=True)
    assert optional.returncode == 0 and "1 skipped" in optional.stdout, optional.stdout
