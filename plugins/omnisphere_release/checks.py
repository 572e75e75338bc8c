"""The release rules, each in one place: the target image and its registry, maintenance windows, the environment's
staging rule, and manifests. preflight, wait_for_window, rollback_<service>, release_all and queue_release call them.

Pure rules take values and return a decision or the problems found; the few that must look at a system do it through
the hooks. None of them raises an Airflow exception: the calling stage decides what a refusal means for its run.
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from omnisphere_release.catalog import Catalog, MaintenanceWindow, Service
from omnisphere_release.contracts import WindowDecision
from omnisphere_release.hooks.ecs import (
    EcsDeploymentError,
    EcsDeploymentHook,
    LiveRevision,
    pinned_image,
    with_image,
)
from omnisphere_release.hooks.registry import ImageCheck, ImageRegistryHook
from omnisphere_release.params import IMAGE_TAG_PATTERN, IMAGE_TAG_RULE
from omnisphere_release.windows import WindowSchedule

# (?!\n): as in IMAGE_TAG_PATTERN, Python's $ would also match before a final newline.
WINDOW_PATTERN = r"^(next|now|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:\d{2}))(?!\n)$"
PRODUCTION = "production"
DEFAULT_MAX_DAYS_AHEAD = 14  # as the catalog's maintenance_window.max_days_ahead defaults
# The Airflow Variable that says which environment this Airflow releases to.
ENVIRONMENT_VARIABLE = "omni_environment"


class Refused(ValueError):
    """A rule refused the request; the message names the param or entry at fault and what to do."""


# --- Params -----------------------------------------------------------------------------------------------------

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def plain_text(value: Any) -> str:
    """Return free text (a reason) as one plain line: control characters (newlines, NUL, ANSI escapes) become a
    space. PostgreSQL text cannot hold NUL, and a log or report line must not be rewritten by what someone typed."""
    return _CONTROL_CHARACTERS.sub(" ", "" if value is None else str(value)).strip()


def unknown_conf_problem(conf: Any, known: Iterable[str]) -> str | None:
    """Return why a run's conf has keys its DAG does not know (a typo such as ``dryRun`` would otherwise be ignored
    and run a real release), naming the closest known key; None when every key is known."""
    known = sorted(known)
    unknown = sorted(set(conf or {}) - set(known))
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5) or difflib.get_close_matches(
            key.lower(), [k.lower() for k in known], n=1, cutoff=0.5)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"unknown param(s) in the run's conf: {', '.join(hints)}; this DAG takes {', '.join(known)}. Nothing "
            f"was changed: trigger it again with the right names.")


# --- The target image -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetImage:
    """The image a release (or a manual rollback) would run, and what its registry says of it."""

    service: str
    live: LiveRevision  # what the service runs now
    image: str
    registry: ImageCheck

    @property
    def running_task_definition(self) -> str:
        return self.live.arn

    @property
    def running_image(self) -> str:
        return self.live.image

    @property
    def problem(self) -> str | None:
        return self.registry.problem

    @property
    def already_running(self) -> bool:
        """Whether the service runs this image now: by its tag, or by the digest the tag points at (ecs_deploy
        deploys by digest)."""
        return self.running_image in {self.image, pinned_image(self.image, self.registry.digest)}

    def describe(self) -> str:
        if self.registry.problem:
            return self.registry.problem
        if self.registry.checked:
            return f"image {self.image} is in ECR: digest {self.registry.digest}, pushed {self.registry.pushed_at}"
        return (f"image {self.image} is not in ECR: its registry is not checked; ECS fails the deployment (and the "
                f"release rolls back) if it cannot pull it")


def target_image(service: Service, tag: str, ecs: EcsDeploymentHook | None = None,
                 registry: ImageRegistryHook | None = None) -> TargetImage:
    """Return the image ``tag`` means for ``service`` (its running image's repository) and whether it was pushed.

    Raises EcsDeploymentError when the running service cannot be read.
    """
    live = (ecs or EcsDeploymentHook(service.aws_conn_id)).live_revision(service.ecs.cluster, service.ecs.service,
                                                                          service.ecs.container)
    image = with_image(live.image, tag)
    check = (registry or ImageRegistryHook(service.aws_conn_id)).check(image)
    return TargetImage(service.name, live, image, check)


# --- Maintenance windows ----------------------------------------------------------------------------------------

def window_schedule(window: MaintenanceWindow) -> WindowSchedule:
    return WindowSchedule(window.cron, timedelta(minutes=window.duration_minutes), window.timezone)


def schedule_of(service: Service) -> WindowSchedule:
    return window_schedule(service.maintenance_window)


def decide_window(schedule: WindowSchedule, window: str, force_reason: str | None, now: datetime,
                  max_days_ahead: float = DEFAULT_MAX_DAYS_AHEAD) -> WindowDecision:
    """Return when a release asked for with param ``window`` may run, and by which right:

    - ``next``: the service's window open now, or the next one (mode ``window``);
    - an ISO 8601 time inside one of the service's windows: from then to that window's end (mode ``window``);
    - an ISO 8601 time outside them, or ``now``: only with a ``force_reason`` (mode ``forced``, no window end).
    A start more than ``max_days_ahead`` days ahead is refused: a run waiting that long would only hold a place.
    """
    reason = (force_reason or "").strip()
    if window == "now":
        if not reason:
            raise Refused(f"param window=now needs param force_reason: say why this release cannot wait for the "
                          f"maintenance window ({schedule.summary()})")
        return {"mode": "forced", "force_reason": reason, "window_start": now.isoformat(), "window_end": None}
    if window == "next":
        found = schedule.window_at(now) or schedule.next_window(now)
        start, end = found.start, found.end
    else:
        if not re.fullmatch(WINDOW_PATTERN, window):
            raise Refused(f"param window {window!r}: use next, now, or an ISO 8601 time with a zone, "
                          f"e.g. 2026-12-06T02:00:00+01:00")
        try:
            start = datetime.fromisoformat(window.replace("Z", "+00:00"))
        except ValueError as exc:  # the pattern's shape, but no such moment (2026-02-30, 25:00)
            raise Refused(f"param window {window!r} is not a real time ({exc}); e.g. 2026-12-06T02:00:00+01:00") \
                from None
        if start > now + timedelta(days=max_days_ahead):
            raise Refused(f"param window {window} is more than {max_days_ahead:g} days ahead (the catalog's "
                          f"maintenance_window.max_days_ahead): trigger the release closer to its window")
        inside = schedule.window_at(start)
        if inside is None:
            if not reason:
                raise Refused(f"param window {window} is outside the maintenance windows of this service "
                              f"({schedule.summary()}): give param force_reason to release then anyway, or pick a "
                              f"time inside a window (the next one starts {schedule.next_window(now).start.isoformat()})")
            if start < now:
                raise Refused(f"param window {window} has passed: use window=now with the same force_reason")
            return {"mode": "forced", "force_reason": reason, "window_start": start.isoformat(), "window_end": None}
        end = inside.end
        if end <= now:
            raise Refused(f"param window {window}: that window ended at {end.isoformat()}")
    return {"mode": "window", "window_start": start.isoformat(), "window_end": end.isoformat(), "force_reason": ""}


def queued_window_start(schedule: WindowSchedule, requested: str, now: datetime) -> datetime:
    """Return the start of the window a manifest is queued for: ``next``, or the exact start of a future window."""
    if requested == "next":
        return schedule.next_window(now).start
    try:
        start = datetime.fromisoformat(requested.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(f"param window {requested!r}: use next or the ISO 8601 start of a window") from None
    if start.tzinfo is None:
        raise Refused(f"param window {requested!r}: give a time zone, e.g. 2026-12-06T02:00:00+01:00")
    window = schedule.window_at(start)
    if window is None or window.start != start.astimezone(timezone.utc):
        raise Refused(f"param window {requested!r} is not the start of a release window "
                      f"({schedule.summary()}); the next one starts {schedule.next_window(now).start.isoformat()}")
    if start <= now:
        raise Refused(f"param window {requested!r} has already started")
    return start


@dataclass(frozen=True)
class DurationEstimate:
    minutes: float
    source: str


def estimate_duration(service: Service, reports: Iterable[dict[str, Any]], samples: int = 5) -> DurationEstimate:
    """Estimate a release's duration: the median of the last successful releases (their reports, newest first),
    else the catalog's ``deploy.estimated_minutes``."""
    durations = []
    for report in reports:
        if report.get("outcome") == "released":
            durations.append(sum(s.get("seconds") or 0 for s in report.get("stages", [])) / 60)
        if len(durations) >= samples:
            break
    if durations:
        return DurationEstimate(statistics.median(durations),
                                f"median of the last {len(durations)} successful release(s)")
    return DurationEstimate(service.deploy.estimated_minutes, "the catalog's deploy.estimated_minutes")


def window_room_problem(window: WindowDecision, needed: DurationEstimate, now: datetime) -> str | None:
    """Return why the release must not start in ``window`` (too little time left), or None."""
    if not window.get("window_end"):
        return None
    end = datetime.fromisoformat(str(window["window_end"]))
    left = (end - now).total_seconds() / 60
    if left < needed.minutes:
        return (f"the maintenance window closes at {end.isoformat()} ({left:.0f} min left) and this release needs "
                f"about {needed.minutes:.0f} min ({needed.source}): not starting it; trigger it for the next window")
    return None


# --- A green run is a true run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObservedState:
    """What a service runs now, as finalize and verify_rollback read it, and who did it where that is recorded."""

    task_definition: str
    registered_by: str | None  # the release run a revision was registered by (its run tag), None: not by a release
    schema_version: int
    applied_versions: tuple[int, ...]
    applied_by: dict[int, str]  # version -> who applied it
    last_actions: dict[int, str]  # version -> the audit log's last entry ("reverted by ...")
    drifted: tuple[str, ...]  # applied files whose content differs from the files now
    dirty: tuple[int, ...]


def truth_problems(service: str, observed: ObservedState, *, task_definition: str, schema_version: int,
                   file_versions: list[int]) -> list[str]:
    """Return every way the observed state differs from the intended one (running ``task_definition``, the schema at
    ``schema_version`` with exactly the files' migrations up to it applied, unchanged), naming who changed it when
    that is recorded. Empty: the run's outcome is true."""
    problems = []
    if observed.task_definition != task_definition:
        by = (f"registered by run {observed.registered_by}" if observed.registered_by
              else "not registered by a release run (deployed by hand, or by another tool)")
        problems.append(f"{service} runs {observed.task_definition}, not {task_definition}: that revision was {by}")
    expected = [v for v in file_versions if v <= schema_version]
    missing = sorted(set(expected) - set(observed.applied_versions))
    extra = sorted(set(observed.applied_versions) - set(expected))
    if observed.schema_version != schema_version or missing or extra:
        detail = [f"version {v} is not applied" + (f": {observed.last_actions[v]}" if v in observed.last_actions
                                                    else "") for v in missing]
        detail += [f"version {v} was applied by {observed.applied_by.get(v, 'someone')}" for v in extra]
        problems.append(f"the schema of {service} is at version {observed.schema_version}, not {schema_version}"
                        + (f" ({'; '.join(detail)})" if detail else ""))
    if observed.dirty:
        problems.append(f"the schema of {service} has dirty version(s) {list(observed.dirty)}: a migration was "
                        f"interrupted")
    if observed.drifted:
        problems.append(f"applied migration file(s) of {service} changed since they were applied: "
                        f"{', '.join(observed.drifted)}")
    return problems


# --- Environments -----------------------------------------------------------------------------------------------

def staging_rule_problem(environment: str, staging_rehearsed: bool, forced: bool = False) -> str | None:
    """In production the checklist requires a staging rehearsal first; a forced release (outside its window, with a
    reason kept in the report) may go without it. Return what is missing, or None."""
    if environment != PRODUCTION or staging_rehearsed or forced:
        return None
    return ("the checklist requires a staging rehearsal in production: release the same image on staging first, "
            "then set param staging_rehearsed")


# --- Manifests (release_all, queue_release) ---------------------------------------------------------------------

def validate_manifest(manifest: Any, known: list[str]) -> dict[str, str]:
    """Return the manifest if every service is known and every tag valid; raise Refused naming the entry."""
    if not isinstance(manifest, dict) or not manifest:
        raise Refused("param 'manifest' must be a non-empty object mapping service names to image tags, "
                      'e.g. {"auth-service": "1.4.0"}')
    for service, tag in manifest.items():
        if service not in known:
            raise Refused(f"param 'manifest': unknown service {service!r}; known services: {', '.join(known)}")
        if not isinstance(tag, str) or not re.fullmatch(IMAGE_TAG_PATTERN, tag):
            raise Refused(f"param 'manifest': image tag {tag!r} of {service} is not a valid tag ({IMAGE_TAG_RULE})")
    return manifest


def manifest_images(catalog: Catalog, manifest: dict[str, str]) -> tuple[list[TargetImage], list[str]]:
    """Check every image of a manifest before the first release starts (otherwise the services before a missing
    image are released and the window is spent); return the images found and the problems."""
    images, problems = [], []
    for name, tag in manifest.items():
        try:
            image = target_image(catalog.get(name), tag)
        except EcsDeploymentError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if image.problem:
            problems.append(f"{name}: {image.problem}")
        else:
            images.append(image)
    return images, problems
