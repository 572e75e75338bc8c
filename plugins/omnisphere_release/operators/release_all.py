"""release_all's check_manifest, start gates and summary, and queue_release's queue: a manifest (service -> image
tag) taken, checked before any release starts, released in waves that follow depends_on, and told."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any, TypedDict
from urllib.parse import quote

from airflow.sdk import BaseOperator, Context, Variable
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release import checks, release_train
from omnisphere_release.catalog import Catalog, CatalogError, ReleaseTrain, load_catalog
from omnisphere_release.contracts import VERIFY_ROLLBACK, ReleaseRun
from omnisphere_release.logs import Log
from omnisphere_release.migrations import InvalidMigrationInput
from omnisphere_release.release_queue import QUEUE_VARIABLE, queue_manifest, take_manifest, window_key
from omnisphere_release.triggers.release_train import ReleaseTrainSlotTrigger

CHECK_MANIFEST = "check_manifest"


def max_parallel_bounds() -> tuple[int, int]:
    """Return the lowest and highest max_parallel, as the catalog's release_train.max_parallel allows them, so that
    the param's schema, check_manifest and the catalog agree."""
    metadata = ReleaseTrain.model_fields["max_parallel"].metadata
    return (next(m.ge for m in metadata if hasattr(m, "ge")), next(m.le for m in metadata if hasattr(m, "le")))


def child_run_id(run_id: str, service: str) -> str:
    """Return the run id of ``service``'s release run started by the release_all run ``run_id``."""
    return f"{run_id}__{service}"


def run_url(dag_id: str, run_id: str) -> str:
    """Return the UI's page of a run (base URL from [api] base_url, as Airflow's own log links)."""
    base = conf.get("api", "base_url", fallback="http://localhost:8080/")
    return f"{base.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"


class CheckedManifest(TypedDict):
    """check_manifest's output: what release_all releases, in which order, and in which window."""

    order: list[str]
    manifest: dict[str, str]
    reason: str
    max_parallel: int
    # The conf of each service's release run. Its window: a scheduled release_all runs in the catalog's release_all
    # window, which stands for the services' windows; a hand-triggered one keeps each service's window ("next")
    # unless it is forced with a reason.
    release_confs: dict[str, dict[str, Any]]


def accept_manifest(catalog: Catalog, manifest: Any, log: Log, refusal: str, environment: str | None = None,
                    evidence_override: str = "") -> dict[str, str]:
    """Validate a manifest, check every image in its registry and, where ``environment`` has ``promote_from``, the
    evidence of each image there (unless ``evidence_override`` overrides it: each release's preflight then records the
    override); raise AirflowFailException starting with ``refusal`` and listing every problem. The one manifest check
    of release_all and queue_release."""
    try:
        manifest = checks.validate_manifest(manifest, catalog.names)
        target = catalog.environment(environment)
    except (checks.Refused, CatalogError) as exc:
        raise AirflowFailException(str(exc)) from None
    images, problems = checks.manifest_images(catalog, manifest, target.name)
    for image in images:
        log.info("%s: %s", image.service, f"image {image.image} is in ECR ({image.registry.digest})"
                 if image.registry.checked else f"image {image.image} is not in ECR: not checked")
    if target.promote_from:
        missing = []
        for image in images:
            try:
                wanted = checks.fingerprint(catalog, image.service, image.registry.digest, None)
            except InvalidMigrationInput as exc:
                problems.append(f"{image.service}: {exc}")
                continue
            verdict = checks.promotion_evidence(catalog, catalog.get(image.service, target.name), target, wanted,
                                                manifest[image.service])
            log.info("%s: %s", image.service, verdict.describe())
            missing += [f"{image.service}: {p}" for p in verdict.problems]
        if missing and evidence_override:
            log.warning("PROMOTION RULE OVERRIDDEN for %d service(s) of the manifest, because: %s; each release's "
                        "preflight records it%s:\n%s", len(missing), evidence_override,
                        " and waits for an approver" if target.approval else "",
                        "\n".join(f"  - {p}" for p in missing))
        elif missing:
            problems += missing + [f"release each image to {target.promote_from} first, or give param "
                                   f"evidence_override (why)"]
    if problems:
        raise AirflowFailException(f"{refusal}:\n" + "\n".join(f"  - {p}" for p in problems))
    return manifest


class ReleaseManifestCheckOperator(BaseOperator):
    """check_manifest: take the manifest (queued for this window when scheduled, else the params) and refuse an
    unknown service, a bad tag, an image that is not in its registry or, in an environment with promote_from, an
    image without evidence there, before any release starts."""

    def execute(self, context: Context) -> CheckedManifest:
        catalog = load_catalog()
        params, dag_run = context["params"], context["dag_run"]
        unknown = checks.unknown_conf_problem(dag_run.conf, self.dag.params.keys())
        if unknown:
            raise AirflowFailException(unknown)
        max_parallel = params.get("max_parallel", catalog.release_train.max_parallel)
        problem = release_train.max_parallel_problem(max_parallel, *max_parallel_bounds())
        if problem:
            raise AirflowFailException(problem)
        entry = {"manifest": params["manifest"], "reason": params.get("reason") or "",
                 "environment": params.get("environment") or catalog.default_environment}
        scheduled = str(getattr(dag_run, "run_type", "")).lower().endswith("scheduled")
        # A run triggered without a logical date (the API's and the UI's default) has no data interval in its context.
        start = context.get("data_interval_start")
        if scheduled:
            assert start is not None, "a scheduled release_all run has a window"
            queued, rest = take_manifest(Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True), start)
            Variable.set(QUEUE_VARIABLE, rest, serialize_json=True)
            if not queued:
                raise AirflowSkipException(f"Nothing queued for the window starting {window_key(start)}; nothing to "
                                           f"release.")
            entry = queued
            self.log.info("Took the manifest queued for the window starting %s: %s", window_key(start), entry)
        # Only a person's evidence_override overrides missing evidence: a scheduled run never does.
        environment = entry.get("environment") or catalog.default_environment
        override = "" if scheduled else checks.plain_text(params.get("evidence_override"))
        manifest = accept_manifest(catalog, entry["manifest"], self.log,
                                   "Refused the manifest before any release started; nothing was changed",
                                   environment, override)
        order = [s.name for s in catalog.release_order(list(manifest))]
        if scheduled and start is not None:
            window, force_reason = "now", (f"in the release_all window {window_key(start)} "
                                           f"({checks.window_schedule(catalog.release_all_window).summary()})"
                                           if catalog.release_all_window else "release_all")
        elif checks.plain_text(params.get("force_reason")):
            window, force_reason = "now", f"release_all forced: {checks.plain_text(params['force_reason'])}"
        else:
            window, force_reason = "next", ""
        waits = {s: [d for d in catalog.get(s).depends_on if d in manifest] for s in order}
        self.log.info("Releasing %s, at most %d at once, each after what it depends on (%s); %s.",
                      ", ".join(f"{s} {manifest[s]}" for s in order), max_parallel,
                      "; ".join(f"{s} after {', '.join(d)}" for s, d in waits.items() if d) or "none depends on another",
                      f"each release now ({force_reason})" if window == "now"
                      else "each release in its own service's next maintenance window")
        reason = checks.plain_text(entry.get("reason"))
        confs = {name: {"image_tag": manifest[name], "reason": f"release_all {context['run_id']}: {reason}",
                        "window": window, "force_reason": force_reason, "environment": environment,
                        **({"evidence_override": override} if override else {})}
                 for name in order}
        return {"order": order, "manifest": manifest, "reason": reason, "max_parallel": max_parallel,
                "release_confs": confs}


class ReleaseTrainSlotOperator(BaseOperator):
    """start_<service>: wait, deferred (no worker slot, no process per check), until fewer than max_parallel services
    of this run are releasing, then let the service's release start; skip it when the manifest leaves it out or when a
    release of this run has failed (what has not started does not start)."""

    # A hand-triggered train releases each service in its own weekly window, one after another when they depend on
    # each other: a gate may wait for a few such windows.
    MAX_WAIT = timedelta(days=22)

    def __init__(self, *, service: str, poll_seconds: float = 10.0, **kwargs: Any) -> None:
        kwargs.setdefault("execution_timeout", timedelta(minutes=5))  # one decision on a worker, not the whole wait
        super().__init__(**kwargs)
        self.service = service
        self.poll_seconds = poll_seconds

    def execute(self, context: Context, deadline: float | None = None) -> None:
        run = ReleaseRun(context)
        checked: CheckedManifest | None = run.output(CHECK_MANIFEST)
        if checked is None:
            raise AirflowSkipException("check_manifest returned nothing: nothing to release")
        decision = release_train.start_decision(self.service, checked["order"], run.task_states(),
                                                checked["max_parallel"])
        if decision.action == "skip":
            raise AirflowSkipException(f"{self.service}: not attempted: {decision.why}")
        if decision.action == "go":
            self.log.info("%s %s starts its release: %s.", self.service, checked["manifest"][self.service],
                          decision.why)
            return
        # Absolute, so that waking up to re-check (another gate took the slot first) does not extend the wait.
        deadline = deadline or time.time() + self.MAX_WAIT.total_seconds()
        self.log.info("%s waits, deferred, for a release slot: %s; checked every %.0fs.", self.service, decision.why,
                      self.poll_seconds)
        self.defer(trigger=ReleaseTrainSlotTrigger(context["dag"].dag_id, context["run_id"], self.service,
                                                   checked["order"], checked["max_parallel"], self.poll_seconds),
                   method_name="execute_complete", kwargs={"deadline": deadline},
                   timeout=timedelta(seconds=max(1.0, deadline - time.time())))

    def execute_complete(self, context: Context, event: dict[str, Any], deadline: float | None = None) -> None:
        # Decide again on this worker: the states may have moved since the trigger read them.
        self.execute(context, deadline)


class ReleaseAllSummaryOperator(BaseOperator):
    """summary: say of each service whether it was released, failed, rolled back or not attempted (and why), with
    the link to its release run; fail the run when any release failed."""

    def execute(self, context: Context) -> dict[str, dict[str, str]]:
        run = ReleaseRun(context)
        states = run.task_states()
        checked: CheckedManifest | None = run.output(CHECK_MANIFEST)
        if checked is None:
            if states.get(CHECK_MANIFEST) == "skipped":
                self.log.info("Nothing was queued for this window: nothing released.")
                return {}
            raise AirflowFailException("release_all stopped: the manifest was refused (see check_manifest); "
                                       "nothing was released")
        catalog = load_catalog()
        order, manifest = checked["order"], checked["manifest"]
        run_id = context["run_id"]
        rolled_back = {}
        for name in order:
            if states.get(release_train.RELEASE_PREFIX + name) == "failed":
                child = context["ti"].get_task_states(dag_id=f"release_{name}", task_ids=[VERIFY_ROLLBACK],
                                                      run_ids=[child_run_id(run_id, name)])
                rolled_back[name] = (child.get(child_run_id(run_id, name)) or {}).get(VERIFY_ROLLBACK) == "success"
        outcomes = release_train.train_outcomes(order, {s.name: s.depends_on for s in catalog.services}, states,
                                                rolled_back)
        summary = {}
        for o in outcomes:
            attempted = o.outcome != release_train.NOT_ATTEMPTED
            url = run_url(f"release_{o.service}", child_run_id(run_id, o.service)) if attempted else ""
            summary[o.service] = {"outcome": o.outcome, "why": o.why, "image_tag": manifest[o.service],
                                  "run_url": url}
            self.log.info("%-24s %-14s %s: %s%s", o.service, manifest[o.service], o.outcome.upper(), o.why,
                          f" ({url})" if url else "")
        stopped = [o for o in outcomes if o.outcome in (release_train.FAILED, release_train.ROLLED_BACK)]
        if stopped:
            # Kept as the task's result even though it fails, for the API, the CLI and the UI's XCom tab.
            context["ti"].xcom_push(key="return_value", value=summary)
            raise AirflowFailException(
                f"release_all stopped: {', '.join(f'{o.service} {o.outcome}' for o in stopped)}; "
                + "; ".join(f"{o.service}: {o.outcome} ({o.why})" for o in outcomes))
        return summary


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
        # Found now, in daylight, rather than when the window opens; release_all checks again then (the evidence may
        # have aged by then). A queued manifest has no force_reason: what it releases must have its evidence.
        environment = params.get("environment") or catalog.default_environment
        manifest = accept_manifest(catalog, params["manifest"], self.log,
                                   "Not queued; fix these, then queue the manifest again", environment)
        entry = {"manifest": manifest, "reason": checks.plain_text(params["reason"]), "environment": environment,
                 "queued_by": context["run_id"]}
        current = Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True)
        Variable.set(QUEUE_VARIABLE, queue_manifest(current, start, entry), serialize_json=True)
        self.log.info("Queued for the release_all window starting %s: %s", window_key(start), manifest)
        return {"window_start": window_key(start), **entry}
