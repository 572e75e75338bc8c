"""The release report: what was asked, what happened at each stage, what was undone, and where things stand now."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from omnisphere_release.checks import plain_text, promotion_summary
from omnisphere_release.contracts import (
    APPROVE_RELEASE,
    BACKUP,
    ECS_DEPLOY,
    FINALIZE,
    INTEGRITY_CHECK,
    MONITORING_GATE,
    PREFLIGHT,
    REGRESSION_TEST,
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
    "refused": "REFUSED: nothing was changed",
    "rejected": "REJECTED at approval: nothing was changed",
    "approval_timed_out": "APPROVAL TIMED OUT: no approver answered in time; nothing was changed",
    "no_approver": "REFUSED at approval: nobody may approve it (see the catalog's approvers); nothing was changed",
    "dry_run": "DRY RUN: preflight printed the plan; nothing was changed",
    "failed": "FAILED",
}


# How approve_release ended -> the release's outcome, when it ended the release (nothing had changed yet).
APPROVAL_OUTCOMES = {"rejected": "rejected", "timed_out": "approval_timed_out", "no_approver": "no_approver"}


def outcome_of(states: dict[str, str], before: dict[str, Any] | None, approval: dict[str, Any] | None = None) -> str:
    if states.get(FINALIZE) == "success":
        return "released"
    if before and before.get("dry_run") and states.get(PREFLIGHT) == "success":
        return "dry_run"
    if states.get(PREFLIGHT) == "failed" or not before:
        return "refused"
    if states.get(APPROVE_RELEASE) == "failed":
        return APPROVAL_OUTCOMES.get(str((approval or {}).get("outcome")), "refused")
    if states.get(VERIFY_ROLLBACK) == "success":
        return "rolled_back"
    return "rollback_incomplete"


def build_report(*, dag_id: str, run_id: str, triggered_by: str | None, params: dict[str, Any],
                 states: dict[str, str], durations: dict[str, float | None], outputs: dict[str, Any],
                 after: dict[str, Any], stage_order: list[str], bake: dict[str, Any] | None = None) -> dict[str, Any]:
    before = outputs.get(PREFLIGHT) or {}
    approval = outputs.get(APPROVE_RELEASE) or {}
    outcome = outcome_of(states, outputs.get(PREFLIGHT), approval)
    window = before.get("window") or outputs.get(WAIT_FOR_WINDOW) or {}
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
        "window": window or None,
        "approval": approval_of(approval, states.get(APPROVE_RELEASE)),
        "audit": audit_of(triggered_by, approval, window),
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
        # The promotion rule, where the environment has one: the evidence used, or the override (preflight).
        "environment": before.get("environment"),
        "promotion": before.get("promotion"),
        "changes": before.get("changes"),
        "rehearsal": before.get("rehearsal"),
        "regression_test": outputs.get(REGRESSION_TEST),
        "monitoring": outputs.get(MONITORING_GATE),
        # The monitoring gate's bake record (XCom key "bake"), pushed whatever its outcome; None if it never ran.
        "bake": bake,
        "rollback": {task_id: {"state": states.get(task_id, "none"), "result": outputs.get(task_id)}
                     for task_id in ROLLBACK_STAGES},
    }


def approval_of(decision: dict[str, Any], state: str | None) -> dict[str, Any]:
    """Return the report's ``approval``: whether four eyes were required, who answered what and when."""
    return {
        "required": bool(decision.get("required")),
        "outcome": decision.get("outcome") or ("not_reached" if state in (None, "none", "upstream_failed") else state),
        "approved_by": decision.get("approved_by"),
        "approved_at": decision.get("approved_at"),
        "rejected_by": decision.get("rejected_by"),
        "rejected_at": decision.get("rejected_at"),
        "comment": decision.get("comment") or "",
        "approvers": decision.get("approvers") or [],
        "deadline": decision.get("deadline"),
        "refused_answers": decision.get("refused_answers") or [],
    }


def audit_of(triggered_by: str | None, decision: dict[str, Any], window: dict[str, Any]) -> dict[str, Any]:
    """Return the report's ``audit``: who decided what about this release (trigger, approval, forced window)."""
    forced = window.get("mode") == "forced"
    return {
        "triggered_by": triggered_by,
        "approved_by": decision.get("approved_by"),
        "approved_at": decision.get("approved_at"),
        "rejected_by": decision.get("rejected_by"),
        "rejected_at": decision.get("rejected_at"),
        # The window is forced by the trigger's params (window, force_reason): by the person who triggered the run.
        "window_forced_by": triggered_by if forced else None,
        "force_reason": window.get("force_reason") if forced else None,
        "refused_answers": decision.get("refused_answers") or [],
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
        f"- Window: {_window(report.get('window'))}"
        + (f" (forced by {_text(by)})" if (by := (report.get("audit") or {}).get("window_forced_by")) else ""),
        f"- Approval: {_approval(report.get('approval'))}",
        "",
        "| | image | task definition | schema version |",
        "| --- | --- | --- | --- |",
        f"| before | {b.get('image')} | {_short(b.get('task_definition'))} | {version_label(b.get('schema_version'))} |",
        f"| target | {t.get('image')}{_digest(t.get('image_digest'))} | | {version_label(t.get('schema_version'))} |",
        f"| after | {a.get('image')} | {_short(a.get('task_definition'))} | {version_label(a.get('schema_version'))} |",
        *_changes(report.get("changes"), report.get("rehearsal")),
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
    if report.get("promotion"):
        lines += ["", "## Promotion", "", _text(promotion_summary(report["promotion"]))]
    if report.get("regression_test"):
        suite = report["regression_test"]
        lines += ["", "## Regression suite", "",
                  f"- {suite['suite']} against {suite['image']}: exit code {suite['exit_code']} in {suite['seconds']}s, "
                  f"{suite['summary'] or 'no output'}" if suite.get("suite") else "- none configured for this service"]
    if report.get("monitoring"):
        lines += ["", "## Metrics observed during the bake", ""]
        lines += [f"- {line}" for line in report["monitoring"].get("observations", [])]
    log_errors = (report.get("bake") or {}).get("log_errors")
    if log_errors and log_errors["count"]:
        lines += ["", "## Error log lines of the new task set during the bake", "",
                  f"{log_errors['count']} line(s) matched the catalog's error patterns; the first ones:", ""]
        lines += [f"- `{line}`" for line in log_errors["samples"]]
    lines += ["", "## Rollback", ""]
    for task_id, entry in report["rollback"].items():
        lines.append(f"- {task_id}: {entry['state']}" + (f" — {_describe(entry['result'])}" if entry["result"] else ""))
    return "\n".join(lines) + "\n"


def _approval(approval: Any) -> str:
    if not approval or not approval.get("required"):
        return "not required"
    refused = "".join(f"; refused the {_text(r.get('option'))} of {_text(r.get('by'))} ({_text(r.get('why'))})"
                      for r in approval.get("refused_answers") or [])
    comment = f" ({_text(approval['comment'])})" if approval.get("comment") else ""
    if approval.get("approved_by"):
        changed = ", but the service had changed while it waited: refused" if approval.get("outcome") == \
            "plan_changed" else ""
        return f"approved by {_text(approval['approved_by'])} at {approval.get('approved_at')}{comment}{refused}" \
               f"{changed}"
    if approval.get("rejected_by"):
        return f"REJECTED by {_text(approval['rejected_by'])} at {approval.get('rejected_at')}{comment}{refused}"
    if approval.get("outcome") == "timed_out":
        return f"TIMED OUT: no answer from {_text(', '.join(approval.get('approvers') or []))} by " \
               f"{approval.get('deadline')}{refused}"
    if approval.get("outcome") == "no_approver":
        return "REFUSED: nobody may approve it (the catalog's approvers less the person who triggered it)"
    return f"required, {approval.get('outcome')}{refused}"


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


def _changes(changes: dict[str, Any] | None, rehearsal: dict[str, Any] | None) -> list[str]:
    """The "Changes" section: what this release changes, for the change record (preflight's checks.changes_of)."""
    if not changes:
        return []
    lines = ["", "## Changes", ""]
    image = changes.get("image") or {}
    lines.append(f"- Image: {_text(image.get('before'))} -> {_text(image.get('after'))}"
                 + (f" (digest {_text(image.get('after_digest'))})" if image.get("after_digest") else ""))
    for m in changes.get("migrations") or []:
        lines.append(f"- Migration {m['version']} {_text(m['name'])}"
                     + (f": {_text(m['description'])}" if m.get("description") else ""))
    if not changes.get("migrations"):
        lines.append("- No schema migration")
    for d in changes.get("data_migrations") or []:
        lines.append(f"- Data migration {_text(d['name'])}" + (f": {_text(d['description'])}" if d.get("description")
                                                                else ""))
    reason = _text(changes.get("reason")) or "(none given)"
    tickets = ", ".join(_text(t) for t in changes.get("tickets") or [])
    lines.append(f"- Reason: {reason}" + (f" (ticket {tickets})" if tickets else ""))
    if rehearsal:
        lock = rehearsal.get("heaviest_lock") or {}
        lines.append(f"- Rehearsed on a copy of {_text(rehearsal.get('environment'))} by {_text(rehearsal.get('run_id'))}: "
                     f"{rehearsal.get('release_minutes')} min of migrations"
                     + (f", heaviest lock {_text(lock.get('mode'))} on {_text(lock.get('relation'))}" if lock else ""))
    return lines
