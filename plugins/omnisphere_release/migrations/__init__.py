"""Schema migration engine: discover, lint, plan, apply and revert NNN_name.up.sql / NNN_name.down.sql files.

Importable without Airflow. Entry points: :class:`MigrationEngine` and ``python -m omnisphere_release.migrations``.
"""

from omnisphere_release.migrations.engine import EngineSettings, MigrationEngine, Plan, RunResult, Status
from omnisphere_release.migrations.errors import InvalidMigrationInput, LockBusy, MigrationError, MigrationFailed
from omnisphere_release.migrations.files import Migration, MigrationFileError, discover

__all__ = [
    "EngineSettings", "InvalidMigrationInput", "LockBusy", "Migration", "MigrationEngine", "MigrationError",
    "MigrationFailed", "MigrationFileError", "Plan", "RunResult", "Status", "discover",
]
