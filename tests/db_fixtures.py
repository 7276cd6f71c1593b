"""Database fixtures for the store tests: the same test against SQLite and PostgreSQL.

PostgreSQL runs when ``KNORMCTL_TEST_PG_URL`` points at a server whose user may
create databases (CI: ``export KNORMCTL_TEST_PG_URL="$(.ci/pg.sh start)"``); each
test gets a database of its own, dropped afterwards. Without a server these tests are
skipped -- unless ``KNORMCTL_REQUIRE_PG=1`` (set by scripts/test.sh, i.e. in CI): then
they fail, so a suite whose PostgreSQL tests did not run cannot pass.
"""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

PG_ENV = "KNORMCTL_TEST_PG_URL"
REQUIRE_ENV = "KNORMCTL_REQUIRE_PG"
PG_SKIP = f"PostgreSQL store tests need {PG_ENV} (e.g. export {PG_ENV}=\"$(.ci/pg.sh start)\")"


def pg_database():
    """Yield the URL of a new, empty PostgreSQL database; drop it afterwards."""
    admin_url = os.environ.get(PG_ENV, "").strip()
    if not admin_url:
        if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
            pytest.fail(f"{REQUIRE_ENV} is set but {PG_ENV} is not: the PostgreSQL store tests cannot run", False)
        pytest.skip(PG_SKIP)
    name = f"knormctl_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")  # a generated hex name: nothing to inject
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A URL of a fresh, empty database: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield from pg_database()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database (skipped without a server)."""
    yield from pg_database()
