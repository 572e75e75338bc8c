"""Database backups: pg_dump (custom format) to S3 with a sha256 and server-side encryption, and the way back.

Credentials reach pg_dump, pg_restore and psql through their environment (PGPASSWORD), never their command line,
where any user of the machine could read them, and never the log.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError


class BackupError(RuntimeError):
    """A dump, upload, verification or restore failed; the message says which and why."""


@dataclass(frozen=True)
class BackupRecord:
    bucket: str
    key: str
    sha256: str
    size_bytes: int
    dump_seconds: float
    upload_seconds: float
    objects: int  # entries listed by pg_restore --list

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def pg_program(name: str) -> str:
    """Find a PostgreSQL client program: OMNI_PG_BIN_DIR if set, else PATH."""
    folder = os.environ.get("OMNI_PG_BIN_DIR")
    if folder and (Path(folder) / name).exists():
        return str(Path(folder) / name)
    found = shutil.which(name)
    if not found:
        raise BackupError(f"{name} not found: install the PostgreSQL client (matching or newer than the server) "
                          f"or set OMNI_PG_BIN_DIR")
    return found


def libpq_env(connect_kwargs: dict[str, Any]) -> dict[str, str]:
    """Return the environment that points libpq programs at a database, password included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    mapping = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE",
               "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "connect_timeout": "PGCONNECT_TIMEOUT"}
    for key, variable in mapping.items():
        if connect_kwargs.get(key) not in (None, ""):
            env[variable] = str(connect_kwargs[key])
    env["PGAPPNAME"] = "omnisphere-backup"
    return env


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], env: dict[str, str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish within {timeout:.0f}s") from None
    if result.returncode != 0:
        raise BackupError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-1500:]}")
    return result


class BackupHook:
    """Dump a service database to S3 and restore it from there."""

    def __init__(self, connect_kwargs: dict[str, Any], s3_client: Any, timeout_seconds: float = 3600) -> None:
        self.connect_kwargs = connect_kwargs
        self.s3 = s3_client
        self.timeout = timeout_seconds

    def check_destination(self, bucket: str) -> None:
        try:
            self.s3.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise BackupError(f"backup bucket s3://{bucket} is not reachable: {exc}; check the Variable "
                              f"omni_backup_bucket and the AWS connection's permissions") from None

    def dump_to_s3(self, bucket: str, key: str, kms_key_id: str | None = None) -> BackupRecord:
        env = libpq_env(self.connect_kwargs)
        with tempfile.TemporaryDirectory(prefix="omni-backup-") as tmp:
            path = Path(tmp) / "backup.dump"
            started = time.monotonic()
            _run([pg_program("pg_dump"), "--format=custom", "--no-password", f"--file={path}"], env,
                 "pg_dump", self.timeout)
            dump_seconds = time.monotonic() - started
            listing = _run([pg_program("pg_restore"), "--list", str(path)], env, "pg_restore --list (verification)",
                           self.timeout)
            objects = sum(1 for line in listing.stdout.splitlines() if line and not line.startswith(";"))
            checksum = sha256_of(path)
            extra: dict[str, Any] = {"Metadata": {"sha256": checksum}}
            extra.update({"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id
                         else {"ServerSideEncryption": "AES256"})
            started = time.monotonic()
            try:
                self.s3.upload_file(str(path), bucket, key, ExtraArgs=extra)
                head = self.s3.head_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise BackupError(f"upload of the backup to s3://{bucket}/{key} failed: {exc}") from None
            upload_seconds = time.monotonic() - started
            size = path.stat().st_size
            if head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != checksum:
                raise BackupError(f"s3://{bucket}/{key} does not match the dump (size {head.get('ContentLength')} "
                                  f"vs {size}); the upload is not trustworthy")
            if not head.get("ServerSideEncryption"):
                raise BackupError(f"s3://{bucket}/{key} is not encrypted at rest; refusing to rely on it")
        return BackupRecord(bucket, key, checksum, size, dump_seconds, upload_seconds, objects)

    def restore_from_s3(self, bucket: str, key: str, expected_sha256: str, schema: str = "public") -> float:
        """Replace ``schema`` with the backup's content in one transaction; return the seconds it took.

        Objects created after the backup (tables of the migrations being undone) are dropped with the schema, and
        the whole restore is one transaction: it either completes or leaves the database as it was.
        """
        env = libpq_env(self.connect_kwargs)
        with tempfile.TemporaryDirectory(prefix="omni-restore-") as tmp:
            path = Path(tmp) / "backup.dump"
            try:
                self.s3.download_file(bucket, key, str(path))
            except (ClientError, BotoCoreError) as exc:
                raise BackupError(f"download of s3://{bucket}/{key} failed: {exc}") from None
            actual = sha256_of(path)
            if actual != expected_sha256:
                raise BackupError(f"s3://{bucket}/{key} has sha256 {actual[:16]}..., expected "
                                  f"{expected_sha256[:16]}...: the backup changed since it was taken; not restoring")
            script = Path(tmp) / "restore.sql"
            _run([pg_program("pg_restore"), "--no-owner", "--no-privileges", f"--file={script}", str(path)], env,
                 "pg_restore (script)", self.timeout)
            wrapper = Path(tmp) / "wrapper.sql"
            wrapper.write_text(f"{self._recreate_schema_sql(schema)}\n\\i {script}\n")
            started = time.monotonic()
            _run([pg_program("psql"), "--no-psqlrc", "--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1",
                  "--no-password", "--file", str(wrapper)], env, "restore (psql --single-transaction)", self.timeout)
            return time.monotonic() - started

    def _recreate_schema_sql(self, schema: str) -> str:
        """Return SQL that drops ``schema`` and creates it again with the same owner, privileges and comment.

        Dropping the schema is what removes the objects created after the backup; recreating it as it was keeps
        ``pg_dump --schema-only`` of the restored database identical to the one before the release.
        """
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(**self.connect_kwargs)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT nspowner::regrole::text, coalesce(nspacl::text[], '{}'), "
                            "obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s", [schema])
                row = cur.fetchone()
                owner, acl, comment = row if row else (None, [], None)
                name = sql.Identifier(schema)
                statements = [sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name),
                              sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(name, sql.Identifier(owner))
                              if owner else sql.SQL("CREATE SCHEMA {}").format(name)]
                rights = {"U": "USAGE", "C": "CREATE"}
                for item in acl:  # e.g. "=U/pg_database_owner": USAGE granted to PUBLIC
                    grantee, _, rest = item.partition("=")
                    letters = rest.split("/", 1)[0]
                    if grantee == owner:
                        continue
                    privileges = sql.SQL(", ").join(sql.SQL(rights[c]) for c in letters if c in rights)
                    target = sql.SQL("PUBLIC") if not grantee else sql.Identifier(grantee.strip('"'))
                    statements.append(sql.SQL("GRANT {} ON SCHEMA {} TO {}").format(privileges, name, target))
                if comment is not None:
                    statements.append(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(name, sql.Literal(comment)))
                return "\n".join(statement.as_string(conn) + ";" for statement in statements)
        finally:
            conn.close()
