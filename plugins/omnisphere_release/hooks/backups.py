"""Database backups: pg_dump (custom format) to S3 with a sha256 and server-side encryption, and the way back.

Credentials reach pg_dump, pg_restore and psql through their environment (PGPASSWORD), never their command line,
where any user of the machine could read them, and never the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from omnisphere_release.catalog import Service


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

    @classmethod
    def for_service(cls, service: Service) -> BackupHook:
        """Return the hook for a catalog service: its database connection, and S3 through its AWS connection."""
        from omnisphere_release.hooks.aws import aws_client
        from omnisphere_release.hooks.postgres import ServiceDatabaseHook

        # The boto client itself, not S3Hook's helpers: a streamed upload with a KMS key and object tags are not
        # among them.
        return cls(ServiceDatabaseHook(service.postgres_conn_id).connect_kwargs(),
                   aws_client("s3", service.aws_conn_id))

    def check_destination(self, bucket: str) -> None:
        try:
            self.s3.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise BackupError(f"backup bucket s3://{bucket} is not reachable: {exc}; check the Variable "
                              f"omni_backup_bucket and the AWS connection's permissions") from None

    def dump_to_s3(self, bucket: str, key: str, kms_key_id: str | None = None) -> BackupRecord:
        """pg_dump into S3 while it runs: the dump streams to a local file (for verification), a sha256 and the
        upload at once, so the stage costs little more than pg_dump itself. The sha256 is stored as an object tag."""
        env = libpq_env(self.connect_kwargs)
        extra: dict[str, Any] = ({"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id
                                 else {"ServerSideEncryption": "AES256"})
        with tempfile.TemporaryDirectory(prefix="omni-backup-") as tmp:
            path = Path(tmp) / "backup.dump"
            started = time.monotonic()
            digest, size = hashlib.sha256(), 0
            read_end, write_end = os.pipe()
            upload_error: list[BaseException] = []

            def upload() -> None:
                with os.fdopen(read_end, "rb") as stream:
                    try:
                        self.s3.upload_fileobj(stream, bucket, key, ExtraArgs=extra)
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                        upload_error.append(exc)
                        stream.read()  # drain, so pg_dump is never blocked on a full pipe

            uploader = threading.Thread(target=upload, name="backup-upload")
            uploader.start()
            process = subprocess.Popen([pg_program("pg_dump"), "--format=custom", "--no-password"], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            dump_out, dump_err = process.stdout, process.stderr
            assert dump_out is not None and dump_err is not None  # both are pipes
            try:
                with open(path, "wb") as local, os.fdopen(write_end, "wb") as upstream:
                    for chunk in iter(lambda: dump_out.read(1 << 20), b""):
                        local.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        if not upload_error:
                            upstream.write(chunk)
                stderr = dump_err.read().decode(errors="replace")
                process.wait(timeout=self.timeout)
            finally:
                uploader.join()
            dump_seconds = time.monotonic() - started
            if process.returncode != 0:
                raise BackupError(f"pg_dump failed (exit {process.returncode}): {stderr.strip()[-1500:]}")
            if upload_error:
                raise BackupError(f"upload of the backup to s3://{bucket}/{key} failed: {upload_error[0]}")
            listing = _run([pg_program("pg_restore"), "--list", str(path)], env, "pg_restore --list (verification)",
                           self.timeout)
            objects = sum(1 for line in listing.stdout.splitlines() if line and not line.startswith(";"))
        checksum = digest.hexdigest()
        started = time.monotonic()
        try:
            self.s3.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": [{"Key": "sha256", "Value": checksum}]})
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise BackupError(f"s3://{bucket}/{key} could not be tagged or read back: {exc}") from None
        if head.get("ContentLength") != size:
            raise BackupError(f"s3://{bucket}/{key} has {head.get('ContentLength')} bytes, the dump {size}: the upload "
                              f"is not trustworthy")
        if not head.get("ServerSideEncryption"):
            raise BackupError(f"s3://{bucket}/{key} is not encrypted at rest; refusing to rely on it")
        return BackupRecord(bucket, key, checksum, size, dump_seconds, time.monotonic() - started, objects)

    def recorded_sha256(self, bucket: str, key: str) -> str | None:
        """Return the sha256 a backup was tagged with when it was taken (None if it has none)."""
        tags = self.s3.get_object_tagging(Bucket=bucket, Key=key).get("TagSet", [])
        return next((t["Value"] for t in tags if t["Key"] == "sha256"), None)

    def restore_from_s3(self, bucket: str, key: str, expected_sha256: str, schema: str = "public") -> float:
        """Replace ``schema`` with the backup's content in one transaction; return the seconds it took.

        Objects created after the backup (tables of the migrations being undone) are dropped with the schema, and
        the whole restore is one transaction: it either completes or leaves the database as it was. The checksum is
        verified while downloading, before anything is restored.
        """
        env = libpq_env(self.connect_kwargs)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="omni-restore-") as tmp:
            path = Path(tmp) / "backup.dump"
            digest = hashlib.sha256()
            try:
                body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
                with open(path, "wb") as local:
                    for chunk in iter(lambda: body.read(1 << 20), b""):
                        local.write(chunk)
                        digest.update(chunk)
            except (ClientError, BotoCoreError) as exc:
                raise BackupError(f"download of s3://{bucket}/{key} failed: {exc}") from None
            actual = digest.hexdigest()
            if actual != expected_sha256:
                raise BackupError(f"s3://{bucket}/{key} has sha256 {actual[:16]}..., expected "
                                  f"{expected_sha256[:16]}...: the backup changed since it was taken; not restoring")
            # pg_restore writes the SQL while psql runs it, inside one transaction that starts by recreating the
            # schema. COMMIT is sent only once pg_restore has finished cleanly: a truncated stream, an error, or a
            # crash ends the session without it, and PostgreSQL rolls everything back.
            restore = subprocess.Popen([pg_program("pg_restore"), "--no-owner", "--no-privileges", "--file=-",
                                        str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            psql = subprocess.Popen([pg_program("psql"), "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1",
                                     "--no-password", "--file=-"], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert restore.stdout and restore.stderr and psql.stdin and psql.stderr  # all are pipes
            try:
                psql.stdin.write(b"BEGIN;\n" + self._recreate_schema_sql(schema).encode() + b"\n")
                shutil.copyfileobj(restore.stdout, psql.stdin, 1 << 20)
                restore.wait(timeout=self.timeout)
                if restore.returncode == 0:
                    psql.stdin.write(b"COMMIT;\n")
            except BrokenPipeError:
                restore.kill()  # psql stopped at an error; its exit code and message say which
            finally:
                with contextlib.suppress(BrokenPipeError):
                    psql.stdin.close()
                psql_err = psql.stderr.read().decode(errors="replace")
                psql.wait(timeout=self.timeout)
                if restore.poll() is None:
                    restore.kill()
                restore_err = restore.stderr.read().decode(errors="replace")
                restore.wait(timeout=self.timeout)
            if psql.returncode != 0:
                raise BackupError(f"restore failed (psql exit {psql.returncode}): {psql_err.strip()[-1500:]}; the "
                                  f"transaction was rolled back, the database is as it was")
            if restore.returncode != 0:
                raise BackupError(f"pg_restore failed (exit {restore.returncode}): {restore_err.strip()[-1500:]}; "
                                  f"the restore transaction was not committed, the database is as it was")
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
