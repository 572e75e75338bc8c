"""The migration engine's small exception family: what went wrong, and whether anything changed."""


class MigrationError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidMigrationInput(MigrationError):
    """Bad files, target or state: the run was refused before it changed anything (CLI exit code 2)."""


class MigrationFailed(MigrationError):
    """A migration failed while running; its transaction was rolled back (CLI exit code 1)."""

    #: whether trying again later may succeed (a lock that was busy), as opposed to SQL that will fail again
    retryable = False


class LockBusy(MigrationFailed):
    """Another run holds the service's migration lock."""

    retryable = True


class LockNotGranted(MigrationFailed):
    """A migration gave up waiting for a table lock the application held, after its bounded retries."""

    retryable = True
