"""``python tests/held_sweep.py ARGS...`` runs ``knormctl ARGS...`` as ``python -m knormctl``
would, but once it has stored ``KNORMCTL_TEST_HOLD_AT`` samples it waits (up to five minutes)
for the signal the test sends. Without the hold, a machine under load could let the sweep
finish all its cells before the test got to interrupt it, and the test would fail for a reason
that has nothing to do with knormctl."""

import os
import sys
import time

from knormctl.store import api

hold_at = int(os.environ["KNORMCTL_TEST_HOLD_AT"])
stored = 0
add_sample = api.Store.add_sample


def held_add_sample(self, *args, **kwargs):
    global stored
    out = add_sample(self, *args, **kwargs)
    stored += 1
    if stored == hold_at:  # the row is committed: the test sees it, then signals
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.05)
    return out


api.Store.add_sample = held_add_sample

from knormctl.cli import main

sys.argv[0] = "knormctl"
main()
