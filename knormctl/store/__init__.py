"""The results store: SQLAlchemy models, migrate-on-open, and the ``Store`` query/write API.

Loads without torch. The CLI, report and plot only use what is exported here.
"""

from knormctl.errors import StoreError
from knormctl.store.db import STATUSES, Store, default_db_path, default_db_url, open_store, to_url, utcnow
from knormctl.store.models import COMPLETE, COMPLETE_WITH_ERRORS, FAILED, INTERRUPTED, RUNNING, Run, Sample

__all__ = [
    "open_store", "Store", "StoreError", "default_db_url", "default_db_path", "to_url", "utcnow",
    "Run", "Sample", "STATUSES", "RUNNING", "COMPLETE", "COMPLETE_WITH_ERRORS", "INTERRUPTED", "FAILED",
]
