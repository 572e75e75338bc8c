"""The release rules, each in one place: the target image and its registry, maintenance windows, promotion on
evidence between environments, and manifests. preflight, wait_for_window, rollback_<service>, release_all and
queue_release call them.

Pure rules take values and return a decision or the problems found; the few that must look at a system do it through
the hooks. None of them raises an Airflow exception: the calling stage decides what a refusal means for its run.
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from omnisphere_release.catalog import Catalog, Environment, MaintenanceWindow, Service
from omnisphere_release.contracts import WindowDecision
from omnisphere_release.hooks.ecs import (
    EcsDeploymentError,
    EcsDeploymentHook,
    LiveRevision,
    pinned_image,
    with_image,
)
from omnisphere_release.hooks.evidence import EvidenceStoreHook, evidence_bucket
from omnisphere_release.hooks.registry import ImageCheck, ImageRegistryHook
from omnisphere_release.params import IMAGE_TAG_PATTERN, IMAGE_TAG_RULE
from omnisphere_release.windows import WindowSchedule

# (?!\n): as in IMAGE_TAG_PATTERN, Python's $ would also match before a final newline.
WINDOW_PATTERN = r"^(next|now|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:\d{2}))(?!\n)$"
DEFAULT_MAX_DAYS_AHEAD = 14  # as the catalog's maintenance_window.max_days_ahead defaults


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


DATABASE_STAGES = ("schema_up", "data_migrate")


def estimate_duration(service: Service, reports: Iterable[dict[str, Any]], samples: int = 5,
                      rehearsal: dict[str, Any] | None = None) -> DurationEstimate:
    """Estimate a release's duration: the median of the last successful releases (their reports, newest first),
    else the catalog's ``deploy.estimated_minutes``. With a rehearsal of this release's migrations on a copy of the
    environment (rehearsal_for), its measured database minutes replace what the database stages took before: the
    history knows the deploy and the bake, the rehearsal knows these migrations on this data."""
    durations, database = [], []
    for report in reports:
        if report.get("outcome") == "released":
            stages = report.get("stages", [])
            durations.append(sum(s.get("seconds") or 0 for s in stages) / 60)
            database.append(sum(s.get("seconds") or 0 for s in stages if s.get("stage") in DATABASE_STAGES) / 60)
        if len(durations) >= samples:
            break
    if durations:
        estimate = DurationEstimate(statistics.median(durations),
                                    f"median of the last {len(durations)} successful release(s)")
    else:
        estimate = DurationEstimate(service.deploy.estimated_minutes, "the catalog's deploy.estimated_minutes")
    if not rehearsal:
        return estimate
    measured = float(rehearsal.get("release_minutes") or 0)
    before = statistics.median(database) if database else 0.0
    return DurationEstimate(max(estimate.minutes - before, 0) + measured,
                            f"{estimate.source}, with the migrations and data migrations as rehearsed on a copy of "
                            f"{rehearsal.get('environment')} by {rehearsal.get('run_id')}: {measured:.1f} min")


def rehearsal_for(rehearsals: Iterable[dict[str, Any]], pending_versions: list[int]) -> dict[str, Any] | None:
    """Return the newest passed rehearsal (newest first) that applied exactly these pending migrations, or None: a
    rehearsal of other migrations says nothing of this release's."""
    for rehearsal in rehearsals:
        steps = (rehearsal.get("migrations") or {}).get("steps") or []
        if rehearsal.get("outcome") == "passed" and [s.get("version") for s in steps] == list(pending_versions):
            return rehearsal
    return None


TICKET = re.compile(r"\b[A-Z][A-Z0-9]+-\d+\b")


def migration_description(sql_text: str) -> str:
    """The first comment line of a migration file that is not a directive: what the migration is for."""
    for line in sql_text.splitlines():
        text = line.strip()
        if text.startswith("--") and not text[2:].strip().lower().startswith("omni:"):
            return text[2:].strip()
        if text and not text.startswith("--"):
            break
    return ""


def changes_of(migrations: Iterable[Any], data_specs: Iterable[Any], previous_image: str, target_image: str,
               target_digest: str | None, reason: str) -> dict[str, Any]:
    """What a release changes, for the report's "Changes" section: the migrations with their descriptions, the data
    migrations, the image before -> after (by digest), and the reason or the ticket it names."""
    return {
        "migrations": [{"version": m.version, "name": m.name, "description": migration_description(m.up.sql)}
                       for m in migrations],
        "data_migrations": [{"name": s.name, "description": s.description} for s in data_specs],
        "image": {"before": previous_image, "after": target_image, "after_digest": target_digest},
        "reason": reason,
        "tickets": sorted(set(TICKET.findall(reason or ""))),
    }


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


# --- Promotion on evidence -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fingerprint:
    """What a release puts into an environment, as promotion compares it: the image, by digest (a tag can be pushed
    again, a digest cannot), and the sha256 of every schema migration file up to the target schema version and of
    every data migration spec. Two releases with the same fingerprint run the same code on the same schema."""

    image_digest: str | None
    schema_version: int
    migrations: dict[str, dict[str, str | None]]  # version -> {"name": label, "up": sha256, "down": sha256 or None}
    data_migrations: dict[str, str]  # spec name -> sha256

    def as_dict(self) -> dict[str, Any]:
        return {"image_digest": self.image_digest, "schema_version": self.schema_version,
                "migrations": self.migrations, "data_migrations": self.data_migrations}

    def describe(self) -> str:
        return (f"image {self.image_digest or '(digest unknown)'}, schema version {self.schema_version} "
                f"({len(self.migrations)} migration file(s)), {len(self.data_migrations)} data migration spec(s)")


def fingerprint(catalog: Catalog, service: str, image_digest: str | None, schema_version: int | None) -> Fingerprint:
    """Return the fingerprint of releasing ``image_digest`` of ``service`` with its schema at ``schema_version``
    (None: the newest migration file), from the migration files and data specs as they are now.

    Raises InvalidMigrationInput when a file cannot be read (the migration plan names the same problem)."""
    from omnisphere_release.datamigrate import discover_specs
    from omnisphere_release.migrations.files import discover

    migrations = discover(catalog.migrations_dir(service))
    target = schema_version if schema_version is not None else max((m.version for m in migrations), default=0)
    return Fingerprint(
        image_digest=image_digest,
        schema_version=target,
        migrations={str(m.version): {"name": m.label, "up": m.up.checksum, "down": m.down.checksum if m.down else None}
                    for m in migrations if m.version <= target},
        data_migrations={spec.name: spec.checksum for spec in discover_specs(catalog.sql_dir / service / "data")},
    )


@dataclass(frozen=True)
class PromotionVerdict:
    """The promotion rule's answer: the evidence that satisfies it, or what is missing (``problems``)."""

    environment: str
    promote_from: str
    evidence: dict[str, Any] | None  # the evidence record (hooks/evidence.py) that satisfies the rule
    problems: list[str]
    examined: int  # releases of this digest found in promote_from

    @property
    def satisfied(self) -> bool:
        return self.evidence is not None

    def describe(self) -> str:
        if self.evidence is None:
            return "no evidence: " + "; ".join(self.problems)
        e = self.evidence
        return (f"evidence: the {self.promote_from} release run {e['run_id']} of {e['service']} released image "
                f"{e['image_digest']} (tag {e.get('image_tag')}) at {e['finished_at']} "
                f"({hours_since(e['finished_at'], None):.1f} h before this check), with the same "
                f"{len(e['migrations'])} migration and {len(e['data_migrations'])} data-migration checksum(s)"
                + (f"; its report: {e['stored_at']}" if e.get("stored_at") else ""))


def hours_since(moment: str, now: datetime | None) -> float:
    then = datetime.fromisoformat(str(moment).replace("Z", "+00:00"))
    return ((now or datetime.now(timezone.utc)) - then).total_seconds() / 3600


def fingerprint_differences(evidence: dict[str, Any], wanted: Fingerprint, source: str) -> list[str]:
    """Return how ``wanted`` differs from what the evidence release ran (in ``source``), one line per file."""
    differences = []
    proven, now = evidence.get("migrations") or {}, wanted.migrations
    if int(evidence.get("schema_version") or 0) != wanted.schema_version:
        differences.append(f"{source} released schema version {evidence.get('schema_version')}, this release "
                           f"targets {wanted.schema_version}")
    for version in sorted(set(proven) | set(now), key=int):
        mine, theirs = now.get(version), proven.get(version)
        if theirs is None:
            differences.append(f"migration {mine['name']} is not part of what {source} released")  # type: ignore[index]
        elif mine is None:
            differences.append(f"migration {theirs['name']} was part of the {source} release, and is not here")
        else:
            for side in ("up", "down"):
                if mine[side] != theirs[side]:
                    differences.append(
                        f"migration {mine['name']}'s checksum differs ({side} file): {_short_sha(mine[side])} now, "
                        f"{_short_sha(theirs[side])} in {source} (the file changed after {source} released it)")
    proven_data, now_data = evidence.get("data_migrations") or {}, wanted.data_migrations
    for name in sorted(set(proven_data) | set(now_data)):
        if name not in proven_data:
            differences.append(f"data migration {name} is not part of what {source} released")
        elif name not in now_data:
            differences.append(f"data migration {name} was part of the {source} release, and is not here")
        elif proven_data[name] != now_data[name]:
            differences.append(f"data migration {name}'s checksum differs: {_short_sha(now_data[name])} now, "
                               f"{_short_sha(proven_data[name])} in {source}")
    return differences


def _short_sha(value: str | None) -> str:
    return value[:12] if value else "(none)"


def promotion_verdict(environment: Environment, wanted: Fingerprint, records: list[dict[str, Any]],
                      now: datetime, image_tag: str = "") -> PromotionVerdict:
    """Apply the promotion rule of ``environment``: a release there needs a successful release in its
    ``promote_from`` environment of the same image digest, with the same migration and data-migration checksums,
    no older than ``evidence_max_age_hours``. ``records`` are the evidence records of that service, environment
    and digest (hooks/evidence.py), in any order. Return the newest record that satisfies the rule, or say exactly
    what is missing, about the newest release that came closest."""
    source = environment.promote_from or ""
    limit = environment.evidence_max_age_hours
    what = f"image {wanted.image_digest}" + (f" (tag {image_tag})" if image_tag else "")

    def verdict(evidence: dict[str, Any] | None, problems: list[str]) -> PromotionVerdict:
        return PromotionVerdict(environment.name, source, evidence, problems, len(records))

    if not wanted.image_digest:
        return verdict(None, [f"the digest of the image is unknown (its registry was not checked), and {source} "
                              f"evidence is matched by digest: push the image to its ECR repository"])
    if not records:
        return verdict(None, [f"no release of {what} in {source}: release it to {source} first (the same tag), "
                              f"then promote it"])
    records = sorted(records, key=lambda r: str(r.get("finished_at")), reverse=True)
    released = [r for r in records if r.get("outcome") == "released"]
    if not released:
        newest = records[0]
        return verdict(None, [f"the {source} release(s) of {what} did not succeed: run {newest['run_id']} ended "
                              f"{newest.get('outcome')} at {newest.get('finished_at')}"
                              + (f" ({len(records)} attempt(s) in all)" if len(records) > 1 else "")
                              + f": fix it and release it to {source} again"])
    closest: list[str] | None = None
    for record in released:
        problems = [f"the {source} release run {record['run_id']} of {what} (released {record['finished_at']}) "
                    f"is not evidence for this one: {difference}"
                    for difference in fingerprint_differences(record, wanted, source)]
        age = hours_since(record["finished_at"], now)
        if age > limit:
            problems.append(f"the newest successful {source} release of {what}, run {record['run_id']}, is "
                            f"{age:.0f} hours old; the limit is {limit:g} hours (environments.{environment.name}."
                            f"evidence_max_age_hours): release it to {source} again")
        if not problems:
            return verdict(record, [])
        closest = closest if closest is not None else problems  # the newest release says what is missing
    return verdict(None, closest or [])


def promotion_summary(promotion: dict[str, Any] | None) -> str | None:
    """Say, for an approver or a reader of the report, what the plan records of the promotion rule (preflight's
    ``promotion``): the evidence used, or the override and what was missing; None where no rule applied."""
    if not promotion:
        return None
    evidence = promotion.get("evidence")
    if evidence:
        return (f"Evidence: the {promotion['promote_from']} release run {evidence['run_id']} released image "
                f"{evidence['image_digest']} (tag {evidence.get('image_tag')}) at {evidence['finished_at']}, with the "
                f"same {len(evidence.get('migrations') or {})} migration and "
                f"{len(evidence.get('data_migrations') or {})} data-migration checksum(s)"
                + (f"; its record: {evidence['stored_at']}" if evidence.get("stored_at") else "") + ".")
    missing = "\n".join(f"- {problem}" for problem in promotion.get("problems") or [])
    if promotion.get("overridden"):
        return (f"NO EVIDENCE from {promotion['promote_from']}: the promotion rule ({promotion['rule']}) was "
                f"OVERRIDDEN because: {promotion['override_reason']}. Missing:\n{missing}")
    return f"No evidence from {promotion['promote_from']}:\n{missing}"


def promotion_evidence(catalog: Catalog, service: Service, environment: Environment, wanted: Fingerprint,
                       image_tag: str = "", now: datetime | None = None) -> PromotionVerdict:
    """Look for the evidence that a release of ``service`` into ``environment`` needs (its ``promote_from``
    environment's releases of the same digest, in the evidence store) and apply :func:`promotion_verdict`."""
    source = str(environment.promote_from)
    bucket = evidence_bucket(catalog)
    if not bucket:
        return PromotionVerdict(environment.name, source, None, [
            f"the Airflow Variable {catalog.evidence_bucket_variable} (the evidence bucket) is not set, so no {source} "
            f"evidence can be found: set it (docs/runbook.md, Promotion)"], 0)
    try:
        records = EvidenceStoreHook(aws_conn_id=service.aws_conn_id).releases(
            bucket, service.name, source, wanted.image_digest) if wanted.image_digest else []
    except Exception as exc:  # noqa: BLE001 - an unreadable store means the evidence cannot be shown: say so
        return PromotionVerdict(environment.name, source, None, [
            f"could not read the evidence store s3://{bucket}: {exc}; try again once it answers"], 0)
    return promotion_verdict(environment, wanted, records, now or datetime.now(timezone.utc), image_tag)


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


def manifest_images(catalog: Catalog, manifest: dict[str, str],
                    environment: str | None = None) -> tuple[list[TargetImage], list[str]]:
    """Check every image of a manifest before the first release starts (otherwise the services before a missing
    image are released and the window is spent), as each service runs in ``environment`` (None: the default one);
    return the images found and the problems."""
    images, problems = [], []
    for name, tag in manifest.items():
        try:
            image = target_image(catalog.get(name, environment), tag)
        except EcsDeploymentError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if image.problem:
            problems.append(f"{name}: {image.problem}")
        else:
            images.append(image)
    return images, problems


# --- Four eyes ------------------------------------------------------------------------------------------------------

def changed_since_plan(plan: Mapping[str, Any], running_task_definition: str, schema_version: int,
                       deployment_in_progress: bool) -> str | None:
    """Say how the service differs from what preflight's plan saw, or None when it is as the plan saw it.

    A release gives its service up while it waits for an approver (approve_release), so that an emergency rollback
    or a hotfix never waits for a person's answer; what was approved is then checked again before anything changes.
    """
    differences = []
    if running_task_definition != plan["previous_task_definition"]:
        differences.append(f"it ran {plan['previous_task_definition']} and runs {running_task_definition} now")
    if schema_version != plan["schema_version"]:
        differences.append(f"its schema was at version {plan['schema_version']} and is at {schema_version} now")
    if deployment_in_progress:
        differences.append("an ECS deployment of it is in progress")
    return "; ".join(differences) or None


def approval_problem(environment: Environment, decision: Mapping[str, Any] | None) -> str | None:
    """Where the environment requires an approval, the run must carry an approver's answer before anything changes.

    Checked again by the first stage that changes something (backup), on approve_release's recorded decision rather than
    on its task state: with FAB, whoever may clear a task may also mark it success, which would pass the gate with no
    answer at all. Return what is missing, or None."""
    if not environment.approval:
        return None
    if decision and decision.get("outcome") == "approved" and decision.get("approved_by"):
        return None
    if decision and decision.get("outcome") == "not_required":  # a dry run: nothing will change
        return None
    return (f"the {environment.name} environment requires an approver's answer before anything changes, and this run "
            f"has none recorded (approve_release was marked done without an approval?): nothing was changed; "
            f"trigger the release again and have an approver answer it")
