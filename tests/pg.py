"""PostgreSQL helpers shared by the tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def schema_dump(dsn: str, pg_bin: str, exclude: str | None = None, privileges: bool = True) -> str:
    """Return ``pg_dump --schema-only`` of a database, without the random ``\\restrict`` key pg_dump 18 adds."""
    command = [str(Path(pg_bin) / "pg_dump"), "--schema-only", "--no-owner", dsn]
    if not privileges:
        command.append("--no-privileges")
    if exclude:
        command.append(f"--exclude-table={exclude}")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in output.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))
