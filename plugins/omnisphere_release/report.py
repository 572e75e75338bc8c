"""The release report: what was asked, what happened at each stage, what was undone, and where things stand now."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from omnisphere_release.checks import plain_text
from omnisphere_release.contracts import (
    BACKUP,
    ECS_DEPLOY,
    FINALIZE,
    INTEGRITY_CHECK,
    MONITORING_GATE,
    PREFLIGHT,
    ROLLBACK_STAGES,
    SCHEMA_UP,
    SMOKE_TEST,
    VERIFY_ROLLBACK,
    WAIT_FOR_WINDOW,
)
from omnisphere_release.migrations.engine import version_label

OUTCOME_TEXT = {
    "released": "RELEASED: every stage passed",
    "rolled_back": "FAILED and ROLLED BACK: the service and the schema are as before the release",
    "rollback_incomplete": "FAILED, ROLLBACK INCOMPLETE: a person must act (see the rollback section)",
    "refused": "REFUSED in preflight: nothing was changed",
    "dry_run": "DRY RUN: preflight printed the plan; nothing was changed",
    "failed": "FAILED",
}


def outcome_of(states: dict[str, str], before: dict[str, Any] | None) -> str:
    if states.get(FINALIZE) == "success":
        return "released"
    if before and before.get("dry_run") and states.get(PREFLIGHT) == "success":
        return "dry_run"
    if states.get(PREFLIGHT) == "failed" or not before:
        return "refused"
    if states.get(VERIFY_ROLLBACK) == "success":
        return "rolled_back"
    return "rollback_incomplete"


def build_report(*, dag_id: str, run_id: str, triggered_by: str | None, params: dict[str, Any],
                 states: dict[str, str], durations: dict[str, float | None], outputs: dict[str, Any],
                 after: dict[str, Any], stage_order: list[str]) -> dict[str, Any]:
    before = outputs.get(PREFLIGHT) or {}
    outcome = outcome_of(states, outputs.get(PREFLIGHT))
    stages = [{"stage": task_id, "state": states.get(task_id, "none"),
               "seconds": round(seconds, 2) if (seconds := durations.get(task_id)) is not None else None}
              for task_id in stage_order]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "service": params.get("service") or before.get("service"),
        "outcome": outcome,
        "summary": OUTCOME_TEXT[outcome],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "triggered_by": triggered_by,
        "reason": params.get("reason") or "",
        "window": before.get("window") or outputs.get(WAIT_FOR_WINDOW),
        "params": params,
        "before": {"image": before.get("previous_image"), "task_definition": before.get("previous_task_definition"),
                   "schema_version": before.get("schema_version")},
        "target": {"image": before.get("target_image"), "image_digest": before.get("target_image_digest"),
                   "schema_version": before.get("target_version")},
        "after": after,
        "stages": stages,
        "backup": outputs.get(BACKUP),
        "migrations_applied": (outputs.get(SCHEMA_UP) or {}).get("versions", []),
        "migration_plan": before.get("plan"),
        "lint": before.get("lint", []),
        "integrity": outputs.get(INTEGRITY_CHECK),
        "deployment": outputs.get(ECS_DEPLOY),
        "smoke_test": outputs.get(SMOKE_TEST),
        "monitoring": outputs.get(MONITORING_GATE),
        "rollback": {task_id: {"state": states.get(task_id, "none"), "result": outputs.get(task_id)}
                     for task_id in ROLLBACK_STAGES},
    }


def render_markdown(report: dict[str, Any]) -> str:
    b, t, a = report["before"], report["target"], report["after"]
    lines = [
        f"# Release report: {report['service']} ({report['run_id']})",
        "",
        f"**{report['summary']}**",
        "",
        f"- Triggered by: {_text(report.get('triggered_by')) or 'unknown'}; "
        f"reason: {_text(report.get('reason')) or '(none given)'}",
        # One JSON line in a fenced block: json.dumps escapes newlines, so nothing in a param can close the fence.
        "- Params:",
        "",
        "```json",
        json.dumps(report["params"], sort_keys=True, default=str),
        "```",
        f"- Window: {_window(report.get('window'))}",
        "",
        "| | image | task definition | schema version |",
        "| --- | --- | --- | --- |",
        f"| before | {b.get('image')} | {_short(b.get('task_definition'))} | {version_label(b.get('schema_version'))} |",
        f"| target | {t.get('image')}{_digest(t.get('image_digest'))} | | {version_label(t.get('schema_version'))} |",
        f"| after | {a.get('image')} | {_short(a.get('task_definition'))} | {version_label(a.get('schema_version'))} |",
        "",
        "## Stages",
        "",
        "| stage | outcome | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s['stage']} | {s['state']} | {s['seconds'] if s['seconds'] is not None else ''} |"
              for s in report["stages"]]
    backup = report.get("backup")
    lines += ["", "## Backup", "",
              f"{backup['uri']} ({backup['size_bytes']} bytes, sha256 `{backup['sha256']}`, encrypted at rest)"
              if backup else "No backup was taken by this run."]
    lines += ["", "## Migrations", "", f"Applied: {report['migrations_applied'] or 'none'}", "",
              "```", str(report.get("migration_plan") or ""), "```"]
    if report.get("integrity"):
        checks = report["integrity"].get("checks", [])
        lines += ["", "## Integrity", ""] + [f"- check {c['check']}: {c['rows']} violating row(s)" for c in checks]
        lines += [f"- rows of {c['table']}: {c['before']} -> {c['after']}" for c in report["integrity"]["row_counts"]]
    if report.get("monitoring"):
        lines += ["", "## Metrics observed during the bake", ""]
        lines += [f"- {line}" for line in report["monitoring"].get("observations", [])]
    lines += ["", "## Rollback", ""]
    for task_id, entry in report["rollback"].items():
        lines.append(f"- {task_id}: {entry['state']}" + (f" — {_describe(entry['result'])}" if entry["result"] else ""))
    return "\n".join(lines) + "\n"


def _window(window: Any) -> str:
    if not window:
        return "not reached"
    if window.get("mode") == "forced":
        return (f"FORCED outside the maintenance window from {window.get('window_start')}, because: "
                f"{_text(window.get('force_reason'))}")
    return f"{window.get('window_start')} to {window.get('window_end')}"


# Control characters (newlines, NUL, ANSI escapes) go; Markdown's own characters are escaped, so that a reason such
# as "**RELEASED**" or "# done" reads as the text someone typed, never as the report's own words.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")


def _text(value: Any) -> str:
    """Return free text (a reason, a name) safe to put in the Markdown report: one line, shown as typed."""
    return _MARKDOWN.sub(r"\\\1", plain_text(value))


def _short(arn: Any) -> str:
    return str(arn).rsplit("/", 1)[-1] if arn else ""


def _describe(result: Any) -> str:
    if isinstance(result, dict):
        return ", ".join(f"{k}: {v}" for k, v in result.items() if v not in (None, [], ""))
    return str(result)


def _digest(digest: str | None) -> str:
    """The digest the target tag pointed at in preflight: a tag can be pushed again, a digest cannot."""
    return f" `{digest}`" if digest else ""
