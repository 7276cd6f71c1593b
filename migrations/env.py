"""Alembic environment for knormctl's results store.

knormctl migrates the database itself when a store is opened
(``knormctl.store.open_store``): it passes an open connection, already inside
a locked transaction, in ``config.attributes["connection"]``, so the migration
and the check that decided to run it are one atomic step.

Developers can also use the ``alembic`` command from the repository root
(``alembic.ini``), e.g. to draft a new revision::

    alembic upgrade head
    alembic revision --autogenerate --rev-id 0003 -m "what changed"

``-x db=URL_OR_PATH`` picks the database (default: ``sqlalchemy.url`` in alembic.ini).
"""

from logging.config import fileConfig

from alembic import context

from knormctl.store.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name and "connection" not in config.attributes:
    fileConfig(config.config_file_name)  # the developer's alembic.ini; knormctl itself logs nothing here


def _configure(**kw) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=kw.pop("is_sqlite"),
        **kw,
    )


def _dev_url() -> str:
    from knormctl.store.locations import to_url

    return to_url(context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url"))


def run_migrations_offline() -> None:
    url = _dev_url()
    _configure(url=url, literal_binds=True, is_sqlite=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # called by knormctl: the caller owns the transaction
        _configure(connection=connection, is_sqlite=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return

    from knormctl.store.connect import make_engine

    engine = make_engine(_dev_url())  # same pragmas as knormctl itself
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # As knormctl's own migrate(): a batch rebuild drops and recreates a table, and with
                # foreign keys on, dropping `runs` cascade-deletes every sample. The pragma must be
                # set outside a transaction, on the driver's connection.
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
            _configure(connection=connection, is_sqlite=sqlite)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows that break a foreign key; nothing was changed")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
