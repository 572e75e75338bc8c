"""Batched, resumable data migrations (keyset batches, one transaction each, a checkpoint row). No Airflow needed.

Entry points: :class:`DataMigrationEngine`, :func:`load_spec` / :func:`discover_specs`, and
``python -m omnisphere_release.datamigrate <service> <name> <run|revert|pause|status>``. A batch is a SQL statement or
a Python function (:func:`load_functions` finds and checks them before any batch runs).
"""

from omnisphere_release.datamigrate.code import load_function, load_functions
from omnisphere_release.datamigrate.engine import BatchSizer, Checkpoint, DataMigrationEngine, DataRunResult
from omnisphere_release.datamigrate.spec import DataMigrationSpec, DataSpecError, discover_specs, load_spec

__all__ = ["BatchSizer", "Checkpoint", "DataMigrationEngine", "DataMigrationSpec", "DataRunResult", "DataSpecError",
           "discover_specs", "load_function", "load_functions", "load_spec"]
