"""The migration engine's small exception family: what went wrong, and whether anything changed."""


class MigrationError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidMigrationInput(MigrationError):
    """Bad files, target or state: the run was refused before it changed anything (CLI exit code 2)."""


class MigrationFailed(MigrationError):
    """A migration failed while running; its transaction was rolled back (CLI exit code 1)."""


class LockBusy(MigrationFailed):
    """Another run holds the service's migration lock."""
