"""The results store: SQLAlchemy models, migrate-on-open, and the ``Store`` query/write API.

Loads without torch. The CLI, report and plot only use what is exported here.
"""

from knormctl.errors import StoreError
from knormctl.store.api import Store
from knormctl.store.db import open_store
from knormctl.store.locations import default_db_path, default_db_url, to_url
from knormctl.store.models import (COMPLETE, COMPLETE_WITH_ERRORS, FAILED, INTERRUPTED, RUNNING, STATUSES, Run, Sample,
                                   utcnow)

__all__ = [
    "open_store", "Store", "StoreError", "default_db_path", "default_db_url", "to_url", "utcnow",
    "Run", "Sample", "STATUSES", "RUNNING", "COMPLETE", "COMPLETE_WITH_ERRORS", "INTERRUPTED", "FAILED",
]
