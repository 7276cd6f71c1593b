"""Exceptions that the CLI turns into one clear line on stderr (no traceback)."""


class KnormctlError(Exception):
    """A failure the user can act on. ``exit_code`` 2 = bad input, 1 = runtime failure."""

    exit_code = 1


class UsageError(KnormctlError, ValueError):
    """Bad user input (options, names, paths): exit code 2, nothing written."""

    exit_code = 2


class StoreError(KnormctlError):
    """The results database cannot be opened or used (not SQLite, newer schema, unwritable...)."""

    exit_code = 2


class AssetError(KnormctlError):
    """A model or text source could not be fetched or loaded (network, disk, missing package)."""

    exit_code = 1
