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


class StoreFailure(StoreError):
    """The database is the right one, but an operation on it failed at run time (a server that
    refuses the connection, a statement, migration or backup that failed): exit code 1."""

    exit_code = 1


class RunNotOwned(StoreError):
    """This process may no longer store into its run: another took it over, or it was deleted."""


class AssetError(KnormctlError):
    """A model or text source could not be fetched or loaded (network, disk, missing package)."""

    exit_code = 1


class ModeError(UsageError):
    """A press asked to cut in a mode it does not support. ``press``: its spec; ``modes``: the
    modes it supports (the caller that chose the mode may say what else to do)."""

    def __init__(self, press: str, modes, mode: str):
        self.press, self.modes = press, tuple(modes)
        super().__init__(f"press {press!r} supports {' and '.join(self.modes)} mode only, not {mode} "
                         f"(use --compress-mode {self.modes[0]})")
