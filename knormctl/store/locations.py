"""Where the results database is: paths and URLs, and the checks made before SQLite touches a file.

A location that is refused (missing folder, a directory, not a SQLite file) is refused
here, before any connection exists, so it is left exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import URL

from knormctl.errors import StoreError

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def default_db_path() -> Path:
    """The SQLite file used when neither ``--db`` nor ``KNORMCTL_DB`` says otherwise."""
    import platformdirs

    return Path(platformdirs.user_data_dir("knormctl", appauthor=False)) / "knormctl.db"


def default_db_url() -> str:
    """``$KNORMCTL_DB`` (a URL or a path), else a SQLite file in the user data folder."""
    env = os.environ.get("KNORMCTL_DB", "").strip()
    return to_url(env) if env else _path_url(default_db_path())


def is_default(url_or_path) -> bool:
    """True when neither the caller nor ``$KNORMCTL_DB`` named a database."""
    return (url_or_path is None or str(url_or_path).strip() == "") and not os.environ.get("KNORMCTL_DB", "").strip()


def to_url(url_or_path: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL (anything with ``://``) is kept; a path becomes ``sqlite:///<absolute path>``;
    None means ``default_db_url()``."""
    if url_or_path is None or str(url_or_path).strip() == "":
        return default_db_url()
    text = str(url_or_path).strip()
    return text if "://" in text else _path_url(Path(text))


def _path_url(path: Path) -> str:
    """``sqlite:///<absolute path>``, escaped by SQLAlchemy: pasted in as text, a '?' in a folder
    name started the URL's query (``/x/a?b/r.db`` opened ``/x/a``) and '%25' was read as '%'."""
    return URL.create("sqlite", database=str(path.expanduser().absolute())).render_as_string(hide_password=False)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for other backends and in-memory databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # a sqlite3 URI: leave it to SQLite
        return None
    return Path(url.database).absolute()


def sqlite_uri(path: Path, **params: str) -> str:
    """A ``file:`` URI for sqlite3 (``uri=True``): the path percent-encoded, so '?', '#' or '%'
    in a folder name cannot be read as URI syntax."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return "file:" + quote(str(path)) + (f"?{query}" if query else "")


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    # An empty file is a new database to SQLite; anything else must start with the header.
    # (Truncation behind a valid header is caught by SQLite itself on the first read.)
    if head and head != SQLITE_HEADER:
        raise StoreError(f"{path} is not a SQLite database (file is not a database)")


def _check_place(path: Path) -> None:
    parent = path.parent
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    if not parent.exists():
        raise StoreError(f"folder {parent} does not exist")
    if not parent.is_dir():
        raise StoreError(f"{parent} is not a folder")


def check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite creates or touches anything, a location that cannot hold our database."""
    _check_place(path)
    # WAL keeps two files next to the database (-wal, -shm): the folder must be writable too.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StoreError(f"folder {path.parent} is not writable")
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"{path} is not writable")
    _check_header(path)


def check_sqlite_file_to_read(path: Path) -> None:
    """The read-only variant: the file must already exist and be readable (nothing is created);
    neither it nor its folder need be writable."""
    _check_place(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if not path.is_file():
        raise StoreError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise StoreError(f"{path} is not readable")
    _check_header(path)


def hide_password(arg: str) -> str:
    """``arg`` with the password of a database URL in it replaced by ``***`` (``--db=URL`` too);
    anything else unchanged. For what is stored or printed: a command line, a hint."""
    head, sep, url_text = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if "://" not in url_text:
        return arg
    try:
        url = parse_url(url_text)
    except StoreError:  # not a URL after all
        return arg
    return arg if url.password is None and "password" not in url.query else head + sep + shown_url(url)


def shown_url(url: URL) -> str:
    """The URL to print or store: its password (``user:PW@`` or ``?password=PW``) as ``***``."""
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True).replace("password=%2A%2A%2A", "password=***")


def parse_url(url_text: str) -> URL:
    """A SQLAlchemy URL, or one line (StoreError) for what is not one (a port not a number)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(url_text)
        url.port  # noqa: B018 -- a port that is not a number fails here, not deep in the driver
    except (ArgumentError, ValueError):
        raise StoreError("invalid database URL (expected a file path, sqlite:///PATH or "
                         "postgresql+psycopg://USER@HOST/DB)") from None
    return url


def hide_passwords_in_command(command_line: str | None) -> str | None:
    """A stored command line (``shlex.join``) with every database URL's password hidden: runs
    stored before knormctl hid it at the source are shown and exported without it too."""
    import shlex

    if not command_line or "://" not in command_line:
        return command_line
    try:
        return shlex.join(hide_password(a) for a in shlex.split(command_line))
    except ValueError:  # not shell syntax after all: keep it whole
        return command_line
