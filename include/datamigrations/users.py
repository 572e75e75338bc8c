"""The migration guide's example: copy users from ``old_users`` to ``new_users``, one key range per call.

``old_users (id bigint PRIMARY KEY, email text, first_name text, last_name text, created_at timestamptz)`` becomes
``new_users (id bigint PRIMARY KEY, email text NOT NULL, full_name text NOT NULL, created_at timestamptz NOT NULL)``:
the e-mail trimmed and lower-cased, the name parts joined. The spec that runs it::

    table: old_users
    key: id
    python: datamigrations.users:copy_users
    verify: SELECT (SELECT count(*) FROM old_users) = (SELECT count(*) FROM new_users)
    reversible: true
    revert: DELETE FROM new_users WHERE id > :last_key AND id <= :upper_key

Rows stream through a named (server-side) cursor and are written in pages, so memory holds one page, not the batch.
"""

from __future__ import annotations

from typing import Any

from psycopg2.extras import execute_values

PAGE_ROWS = 1000


def full_name(first_name: str | None, last_name: str | None) -> str:
    """Join the name parts that are there, without stray spaces."""
    return " ".join(part.strip() for part in (first_name, last_name) if part and part.strip())


def copy_users(conn: Any, last_key: int, upper_key: int) -> int:
    """Copy the users with ``last_key < id <= upper_key`` into new_users; return how many were copied.

    Runs inside the engine's batch transaction, which also advances the checkpoint: it must not commit.
    """
    copied = 0
    with conn.cursor(name="old_users_batch") as source, conn.cursor() as target:
        source.itersize = PAGE_ROWS
        source.execute("SELECT id, email, first_name, last_name, created_at FROM old_users "
                       "WHERE id > %s AND id <= %s ORDER BY id", [last_key, upper_key])
        while rows := source.fetchmany(PAGE_ROWS):
            execute_values(target, "INSERT INTO new_users (id, email, full_name, created_at) VALUES %s",
                           [(id_, email.strip().lower(), full_name(first, last), created)
                            for id_, email, first, last, created in rows], page_size=PAGE_ROWS)
            copied += len(rows)
    return copied
