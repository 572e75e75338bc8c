"""release_all's check_manifest and summary, and queue_release's queue: a manifest (service -> image tag) taken,
checked before any release starts, released in depends_on order, and told."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, TypedDict

from airflow.sdk import BaseOperator, Context, Variable
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release import checks
from omnisphere_release.catalog import Catalog, load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.logs import Log
from omnisphere_release.release_queue import QUEUE_VARIABLE, queue_manifest, take_manifest, window_key

CHECK_MANIFEST = "check_manifest"


class CheckedManifest(TypedDict):
    """check_manifest's output: what release_all releases, in which order, and in which window."""

    order: list[str]
    manifest: dict[str, str]
    reason: str
    # The conf of each service's release run. Its window: a scheduled release_all runs in the catalog's release_all
    # window, which stands for the services' windows; a hand-triggered one keeps each service's window ("next")
    # unless it is forced with a reason.
    release_confs: dict[str, dict[str, Any]]


def accept_manifest(catalog: Catalog, manifest: Any, log: Log, refusal: str) -> dict[str, str]:
    """Validate a manifest and check every image in its registry; raise AirflowFailException starting with
    ``refusal`` and listing every problem. The one manifest check of release_all and queue_release."""
    try:
        manifest = checks.validate_manifest(manifest, catalog.names)
    except checks.Refused as exc:
        raise AirflowFailException(str(exc)) from None
    images, problems = checks.manifest_images(catalog, manifest)
    for image in images:
        log.info("%s: %s", image.service, f"image {image.image} is in ECR ({image.registry.digest})"
                 if image.registry.checked else f"image {image.image} is not in ECR: not checked")
    if problems:
        raise AirflowFailException(f"{refusal}:\n" + "\n".join(f"  - {p}" for p in problems))
    return manifest


class ReleaseManifestCheckOperator(BaseOperator):
    """check_manifest: take the manifest (queued for this window when scheduled, else the params) and refuse an
    unknown service, a bad tag, an image that is not in its registry or a skipped staging rehearsal, before any
    release starts."""

    def execute(self, context: Context) -> CheckedManifest:
        catalog = load_catalog()
        params, dag_run = context["params"], context["dag_run"]
        unknown = checks.unknown_conf_problem(dag_run.conf, self.dag.params.keys())
        if unknown:
            raise AirflowFailException(unknown)
        entry = {"manifest": params["manifest"], "reason": params.get("reason") or "",
                 "staging_rehearsed": params.get("staging_rehearsed", False)}
        scheduled = str(getattr(dag_run, "run_type", "")).lower().endswith("scheduled")
        start = context["data_interval_start"]
        if scheduled:
            assert start is not None, "a scheduled release_all run has a window"
            queued, rest = take_manifest(Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True), start)
            Variable.set(QUEUE_VARIABLE, rest, serialize_json=True)
            if not queued:
                raise AirflowSkipException(f"Nothing queued for the window starting {window_key(start)}; nothing to "
                                           f"release.")
            entry = queued
            self.log.info("Took the manifest queued for the window starting %s: %s", window_key(start), entry)
        manifest = accept_manifest(catalog, entry["manifest"], self.log,
                                   "Refused the manifest before any release started; nothing was changed")
        staging = checks.staging_rule_problem(Variable.get(checks.ENVIRONMENT_VARIABLE, default=checks.PRODUCTION),
                                              bool(entry.get("staging_rehearsed")))
        if staging:
            raise AirflowFailException(staging)
        order = [s.name for s in catalog.release_order(list(manifest))]
        if scheduled and start is not None:
            window, force_reason = "now", (f"in the release_all window {window_key(start)} "
                                           f"({checks.window_schedule(catalog.release_all_window).summary()})"
                                           if catalog.release_all_window else "release_all")
        elif checks.plain_text(params.get("force_reason")):
            window, force_reason = "now", f"release_all forced: {checks.plain_text(params['force_reason'])}"
        else:
            window, force_reason = "next", ""
        self.log.info("Releasing in this order: %s; %s.", ", ".join(f"{s} {manifest[s]}" for s in order),
                      f"each release now ({force_reason})" if window == "now"
                      else "each release in its own service's next maintenance window")
        reason = checks.plain_text(entry.get("reason"))
        confs = {name: {"image_tag": manifest[name], "reason": f"release_all {context['run_id']}: {reason}",
                        "window": window, "force_reason": force_reason,
                        "staging_rehearsed": bool(entry.get("staging_rehearsed"))} for name in order}
        return {"order": order, "manifest": manifest, "reason": reason, "release_confs": confs}


class ReleaseAllSummaryOperator(BaseOperator):
    """summary: say which services were released, which failed (and rolled back), which were not attempted."""

    def execute(self, context: Context) -> dict[str, str]:
        run = ReleaseRun(context)
        states = run.task_states()
        checked: CheckedManifest | None = run.output(CHECK_MANIFEST)
        manifest = checked["manifest"] if checked else {}
        outcome = {}
        for name in (checked["order"] if checked else []):
            state = states.get(f"release_{name}", "none")
            outcome[name] = {"success": "released", "failed": "failed and rolled back (see its release run)",
                             }.get(state, "not attempted (an earlier release failed)")
            self.log.info("%s %s: %s", name, manifest[name], outcome[name])
        if states.get(CHECK_MANIFEST) == "skipped":
            self.log.info("Nothing was queued for this window: nothing released.")
        if any(text.startswith("failed") for text in outcome.values()) or states.get(CHECK_MANIFEST) == "failed":
            raise AirflowFailException(f"release_all stopped: {outcome or 'the manifest was refused'}")
        return outcome


class QueueReleaseOperator(BaseOperator):
    """queue: validate the manifest, its images and the window, then queue it for that release_all window."""

    def execute(self, context: Context) -> dict[str, Any]:
        catalog = load_catalog()
        if catalog.release_all_window is None:
            raise AirflowFailException(f"{catalog.path}: release_all_window is not set; nothing can be queued")
        schedule = checks.window_schedule(catalog.release_all_window)
        params = context["params"]
        unknown = checks.unknown_conf_problem(getattr(context.get("dag_run"), "conf", None), self.dag.params.keys())
        if unknown:
            raise AirflowFailException(unknown)
        try:
            start = checks.queued_window_start(schedule, params["window"], datetime.now(timezone.utc))
        except checks.Refused as exc:
            raise AirflowFailException(str(exc)) from None
        # Found now, in daylight, rather than when the window opens; release_all checks again then.
        manifest = accept_manifest(catalog, params["manifest"], self.log,
                                   "Not queued; fix these, then queue the manifest again")
        entry = {"manifest": manifest, "reason": checks.plain_text(params["reason"]),
                 "staging_rehearsed": params["staging_rehearsed"], "queued_by": context["run_id"]}
        current = Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True)
        Variable.set(QUEUE_VARIABLE, queue_manifest(current, start, entry), serialize_json=True)
        self.log.info("Queued for the release_all window starting %s: %s", window_key(start), manifest)
        return {"window_start": window_key(start), **entry}
