"""Batched, resumable data migrations (keyset batches, one transaction each, a checkpoint row). No Airflow needed.

Entry points: :class:`DataMigrationEngine`, :func:`load_spec` / :func:`discover_specs`, and
``python -m omnisphere_release.datamigrate <service> <name> <run|revert|pause|status>``.
"""

from omnisphere_release.datamigrate.engine import Checkpoint, DataMigrationEngine, DataRunResult
from omnisphere_release.datamigrate.spec import DataMigrationSpec, DataSpecError, discover_specs, load_spec

__all__ = ["Checkpoint", "DataMigrationEngine", "DataMigrationSpec", "DataRunResult", "DataSpecError",
           "discover_specs", "load_spec"]
