"""Lint pending migration files with squawk (the squawk-cli package).

Every squawk finding blocks the plan, except:
- rules the engine makes moot (it sets lock_timeout and statement_timeout itself and runs each migration in a
  transaction), which are not asked for at all;
- style rules that do not lock anything, reported as advice;
- findings the file accepts with ``-- omni:lint-ignore <rule> <reason>``, reported with their reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omnisphere_release.migrations.files import Migration

# The engine sets both timeouts on every migration and runs each in its own transaction.
MOOT_RULES = ("require-lock-timeout", "require-statement-timeout", "prefer-robust-stmts")
# These concern data types and naming, not locks: worth reading, not worth stopping a release for.
ADVISORY_RULES = frozenset({
    "prefer-bigint-over-int", "prefer-bigint-over-smallint", "prefer-identity", "prefer-text-field",
    "ban-char-field", "prefer-timestamptz", "prefer-big-int", "require-table-schema",
})


class LintUnavailable(RuntimeError):
    """squawk is not installed where the engine runs."""


@dataclass(frozen=True)
class Finding:
    file: Path
    version: int
    rule: str
    line: int
    message: str
    severity: str  # "blocking", "advice" or "ignored"
    ignore_reason: str | None = None

    def describe(self) -> str:
        text = f"{self.file.name}:{self.line + 1}: {self.rule}: {self.message}"
        if self.ignore_reason:
            text += f" (ignored: {self.ignore_reason})"
        return text


def squawk_executable() -> str:
    # Prefer the one installed beside this Python (the project's venv), then PATH.
    candidate = Path(sys.executable).with_name("squawk")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("squawk")
    if not found:
        raise LintUnavailable("squawk is not installed; install squawk-cli (it is in requirements.txt)")
    return found


def lint(migrations: list[Migration], pg_version: str = "16") -> list[Finding]:
    """Lint the up files of ``migrations``; return every finding with its severity."""
    by_path = {m.up.path.resolve(): m for m in migrations}
    findings: list[Finding] = []
    in_transaction = [m.up.path for m in migrations if not m.up.no_transaction]
    outside = [m.up.path for m in migrations if m.up.no_transaction]
    for paths, assume_transaction in ((in_transaction, True), (outside, False)):
        if not paths:
            continue
        for raw in _run_squawk(paths, assume_transaction, pg_version):
            migration = by_path[Path(raw["file"]).resolve()]
            rule = raw["rule_name"]
            reason = migration.up.lint_ignores.get(rule)
            severity = "ignored" if reason else ("advice" if rule in ADVISORY_RULES else "blocking")
            findings.append(Finding(file=migration.up.path, version=migration.version, rule=rule,
                                    line=int(raw.get("line") or 0), message=raw.get("message", ""),
                                    severity=severity, ignore_reason=reason))
    return sorted(findings, key=lambda f: (f.version, f.line, f.rule))


def _run_squawk(paths: list[Path], assume_transaction: bool, pg_version: str) -> list[dict]:
    command = [squawk_executable(), "--reporter", "json", f"--pg-version={pg_version}",
               f"--exclude={','.join(MOOT_RULES)}"]
    if assume_transaction:
        command.append("--assume-in-transaction")
    command += [str(p) for p in paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    try:
        return json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        raise RuntimeError(f"squawk failed (exit {result.returncode}): {result.stderr.strip()[:2000]}") from None
