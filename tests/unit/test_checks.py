"""The release rules of omnisphere_release.checks: maintenance windows, duration estimates, the promotion rule,
manifests, and the target image (with stand-ins for the ECS and ECR hooks; nothing reaches AWS).

queued_window_start is covered by test_release_queue.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from omnisphere_release import checks
from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.checks import (
    DurationEstimate,
    Refused,
    TargetImage,
    decide_window,
    estimate_duration,
    manifest_images,
    target_image,
    validate_manifest,
    window_room_problem,
)
from omnisphere_release.hooks.ecs import EcsDeploymentError, LiveRevision
from omnisphere_release.hooks.registry import ImageCheck
from omnisphere_release.windows import WindowSchedule

CATALOG = load_catalog()
AUTH = CATALOG.get("auth-service")

# Sundays 02:00-04:00 in Paris; in November Paris is UTC+1, so a window is 01:00-03:00 UTC.
SCHEDULE = WindowSchedule("0 2 * * SUN", timedelta(minutes=120), "Europe/Paris")
WEDNESDAY = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
SUNDAY_0100_UTC = datetime(2026, 11, 29, 1, 0, tzinfo=timezone.utc)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- decide_window ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_reason", ["", "   ", None])
def test_window_now_needs_a_force_reason_and_says_which_window_it_skips(force_reason):
    with pytest.raises(Refused) as raised:
        decide_window(SCHEDULE, "now", force_reason, WEDNESDAY)

    message = str(raised.value)
    assert "param window=now needs param force_reason" in message
    assert "(Sun 02:00-04:00 Europe/Paris)" in message


def test_window_now_with_a_reason_is_forced_from_now_with_no_window_end():
    decision = decide_window(SCHEDULE, "now", "  CVE-2026-1234 in the session library ", WEDNESDAY)

    assert decision == {"mode": "forced", "force_reason": "CVE-2026-1234 in the session library",
                        "window_start": WEDNESDAY.isoformat(), "window_end": None}


@pytest.mark.parametrize("now", [
    SUNDAY_0100_UTC,  # the window opens this instant
    SUNDAY_0100_UTC + timedelta(minutes=30),
    SUNDAY_0100_UTC + timedelta(minutes=119, seconds=59),
])
def test_window_next_inside_an_open_window_is_that_window(now):
    decision = decide_window(SCHEDULE, "next", "", now)

    assert decision["mode"] == "window"
    assert decision["force_reason"] == ""
    assert at(decision["window_start"]) == SUNDAY_0100_UTC
    assert at(decision["window_end"]) == SUNDAY_0100_UTC + timedelta(minutes=120)


@pytest.mark.parametrize(("now", "next_start"), [
    (WEDNESDAY, SUNDAY_0100_UTC),
    (SUNDAY_0100_UTC - timedelta(seconds=1), SUNDAY_0100_UTC),
    # At its end a window is closed: the next one is a week later.
    (SUNDAY_0100_UTC + timedelta(minutes=120), SUNDAY_0100_UTC + timedelta(days=7)),
])
def test_window_next_outside_a_window_is_the_next_one(now, next_start):
    decision = decide_window(SCHEDULE, "next", "", now)

    assert decision["mode"] == "window"
    assert at(decision["window_start"]) == next_start
    assert at(decision["window_end"]) == next_start + timedelta(minutes=120)


@pytest.mark.parametrize("window", ["2026-11-29T02:30:00+01:00", "2026-11-29T01:30Z", "2026-11-29T01:30:00.000Z"])
def test_an_iso_time_inside_a_window_runs_then_until_that_window_closes(window):
    decision = decide_window(SCHEDULE, window, "", WEDNESDAY)

    assert decision["mode"] == "window"
    assert decision["force_reason"] == ""
    assert at(decision["window_start"]) == datetime(2026, 11, 29, 1, 30, tzinfo=timezone.utc)
    assert at(decision["window_end"]) == SUNDAY_0100_UTC + timedelta(minutes=120)  # the window's own end


@pytest.mark.parametrize("force_reason", ["", "  ", None])
def test_an_iso_time_outside_the_windows_needs_a_force_reason(force_reason):
    # A Thursday 09:16 UTC start for a "Sun 02:00-04:00 Europe/Paris" service is no maintenance window.
    with pytest.raises(Refused) as raised:
        decide_window(SCHEDULE, "2026-11-26T09:16:00Z", force_reason, WEDNESDAY)

    message = str(raised.value)
    assert message.startswith("param window 2026-11-26T09:16:00Z is outside the maintenance windows of this service "
                              "(Sun 02:00-04:00 Europe/Paris): give param force_reason")
    assert "the next one starts 2026-11-29T01:00:00+00:00" in message


def test_an_iso_time_outside_the_windows_with_a_reason_is_forced_then_with_no_window_end():
    decision = decide_window(SCHEDULE, "2026-11-26T09:16:00Z", "vendor deadline", WEDNESDAY)

    assert decision == {"mode": "forced", "force_reason": "vendor deadline",
                        "window_start": "2026-11-26T09:16:00+00:00", "window_end": None}


def test_a_forced_time_that_has_passed_is_refused():
    with pytest.raises(Refused, match="has passed: use window=now"):
        decide_window(SCHEDULE, "2026-11-25T09:16:00Z", "vendor deadline", WEDNESDAY)


@pytest.mark.parametrize("window", ["9999-12-31T00:00:00Z", "2026-12-13T02:00:00+01:00"])
def test_a_start_further_ahead_than_the_catalog_allows_is_refused(window):
    # 9999-12-31 would wait for ever and hold a place; 18 days ahead is past the default of 14.
    with pytest.raises(Refused, match=r"is more than 14 days ahead \(the catalog's maintenance_window.max_days_ahead\)"):
        decide_window(SCHEDULE, window, "any reason", WEDNESDAY)
    assert decide_window(SCHEDULE, "2026-12-13T02:00:00+01:00", "", WEDNESDAY, max_days_ahead=30)["mode"] == "window"


def test_an_iso_time_in_a_window_that_is_open_now_is_accepted():
    now = SUNDAY_0100_UTC + timedelta(minutes=60)
    decision = decide_window(SCHEDULE, "2026-11-29T02:30:00+01:00", "", now)  # 01:30 UTC, half an hour ago

    assert decision["mode"] == "window"
    assert at(decision["window_end"]) == SUNDAY_0100_UTC + timedelta(minutes=120)


def test_an_iso_time_in_a_window_that_has_ended_is_refused_naming_its_end():
    with pytest.raises(Refused) as raised:
        decide_window(SCHEDULE, "2026-11-22T02:00:00+01:00", "", WEDNESDAY)

    assert str(raised.value) == "param window 2026-11-22T02:00:00+01:00: that window ended at 2026-11-22T03:00:00+00:00"


@pytest.mark.parametrize("window", ["tomorrow", "", "Next", "2026-12-06T02:00:00", "2026-12-06 02:00:00+01:00",
                                    "2026-12-06"])
def test_a_malformed_window_is_refused_naming_the_param_and_the_forms(window):
    with pytest.raises(Refused) as raised:
        decide_window(SCHEDULE, window, "a reason does not make a malformed window valid", WEDNESDAY)

    assert str(raised.value) == (f"param window {window!r}: use next, now, or an ISO 8601 time with a zone, "
                                 f"e.g. 2026-12-06T02:00:00+01:00")


def test_the_schedule_of_a_service_is_its_catalog_window():
    schedule = checks.schedule_of(AUTH)
    window = AUTH.maintenance_window

    assert schedule.cron == window.cron
    assert schedule.duration == timedelta(minutes=window.duration_minutes)
    assert schedule.tz_name == window.timezone


# --- estimate_duration ---------------------------------------------------------------------------------------------


def report(outcome: str, *stage_seconds: float | None) -> dict[str, Any]:
    return {"outcome": outcome, "stages": [{"name": f"stage{i}", "seconds": s} for i, s in enumerate(stage_seconds)]}


def with_estimate(service: Service, minutes: float) -> Service:
    return service.model_copy(update={"deploy": service.deploy.model_copy(update={"estimated_minutes": minutes})})


def test_the_estimate_is_the_median_of_the_newest_successful_releases():
    reports = [  # newest first
        report("released", 300, 300),  # 10 min
        report("failed", 7200),  # a failed release says nothing about how long a release takes
        report("released", 1200),  # 20 min
        report("rolled_back", 60),
        report("released", 240, 60),  # 5 min
        report("released", 6000),  # 100 min: older than the last 3 successes
        report("released", 6000),
    ]

    estimate = estimate_duration(AUTH, reports, samples=3)

    assert estimate == DurationEstimate(10, "median of the last 3 successful release(s)")


def test_the_estimate_of_an_even_number_of_releases_averages_the_middle_two_and_counts_missing_seconds_as_zero():
    estimate = estimate_duration(AUTH, [report("released", 600, None), report("released", 1200, None, 0)])

    assert estimate == DurationEstimate(15, "median of the last 2 successful release(s)")


def test_the_estimate_reads_no_more_reports_than_it_needs():
    read: list[int] = []

    def newest_first():
        for i in range(10):
            read.append(i)
            yield report("released", 60 * (i + 1))

    estimate = estimate_duration(AUTH, newest_first(), samples=5)

    assert estimate.minutes == 3  # median of 1..5 minutes
    assert read == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("reports", [[], [report("failed", 600), report("rolled_back", 900)], [{}]])
def test_without_a_successful_release_the_estimate_is_the_catalogs(reports):
    service = with_estimate(AUTH, 37)

    assert estimate_duration(service, reports) == DurationEstimate(37, "the catalog's deploy.estimated_minutes")


# --- window_room_problem -------------------------------------------------------------------------------------------

WINDOW_END = "2026-11-29T03:00:00+00:00"
NEEDED = DurationEstimate(45, "median of the last 5 successful release(s)")


@pytest.mark.parametrize("decision", [
    {"mode": "now", "force_reason": "hotfix", "window_start": WEDNESDAY.isoformat(), "window_end": None},
    {},
])
def test_a_forced_release_or_one_without_a_window_end_always_has_room(decision):
    assert window_room_problem(decision, DurationEstimate(10_000, "x"), WEDNESDAY) is None


def test_too_little_room_left_in_the_window_names_the_minutes_left_and_needed():
    decision = {"mode": "window", "window_start": "2026-11-29T01:00:00+00:00", "window_end": WINDOW_END}

    problem = window_room_problem(decision, NEEDED, at("2026-11-29T02:30:00+00:00"))

    assert problem == ("the maintenance window closes at 2026-11-29T03:00:00+00:00 (30 min left) and this release "
                       "needs about 45 min (median of the last 5 successful release(s)): not starting it; trigger it "
                       "for the next window")


@pytest.mark.parametrize("now", ["2026-11-29T02:15:00+00:00", "2026-11-29T01:00:00+00:00"])
def test_enough_room_left_in_the_window_is_no_problem(now):
    decision = {"mode": "window", "window_start": "2026-11-29T01:00:00+00:00", "window_end": WINDOW_END}

    assert window_room_problem(decision, NEEDED, at(now)) is None  # 45 min left (exactly enough), and 120


# --- promotion_verdict ---------------------------------------------------------------------------------------------

PRODUCTION = CATALOG.environment("production")
PROMOTED_DIGEST = "sha256:" + "a" * 64
CHECKED_AT = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
WANTED = checks.Fingerprint(
    image_digest=PROMOTED_DIGEST, schema_version=4,
    migrations={str(v): {"name": f"00{v}_m", "up": f"up{v}" * 8, "down": f"down{v}" * 8} for v in range(1, 5)},
    data_migrations={"backfill": "d" * 64})


def evidence(run_id: str = "run-1", outcome: str = "released", hours_ago: float = 2, **changes: Any) -> dict:
    """An evidence record of a staging release of WANTED (hooks/evidence.py), changed by ``changes``."""
    record = {"service": "auth-service", "environment": "staging", "image_digest": PROMOTED_DIGEST, "image_tag": "1.2.0",
              "run_id": run_id, "outcome": outcome, "finished_at": (CHECKED_AT - timedelta(hours=hours_ago)).isoformat(),
              "schema_version": 4, "migrations": {k: dict(v) for k, v in WANTED.migrations.items()},
              "data_migrations": dict(WANTED.data_migrations)}
    record.update(changes)
    return record


def test_promotion_names_the_newest_successful_release_of_the_same_digest_and_checksums():
    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [evidence("old", hours_ago=20), evidence("new"),
                                                            evidence("failed", outcome="rolled_back", hours_ago=1)],
                                       CHECKED_AT, "1.2.0")

    assert verdict.satisfied and verdict.evidence["run_id"] == "new" and verdict.problems == []
    assert verdict.examined == 3


def test_promotion_without_any_release_of_the_digest_says_so_and_what_to_do():
    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [], CHECKED_AT, "1.2.0")

    assert not verdict.satisfied
    assert verdict.problems == [f"no release of image {PROMOTED_DIGEST} (tag 1.2.0) in staging: release it to staging first "
                                f"(the same tag), then promote it"]


def test_promotion_of_a_digest_whose_staging_releases_failed_names_the_last_attempt():
    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [evidence("r1", outcome="rolled_back", hours_ago=3),
                                                            evidence("r2", outcome="rollback_incomplete")], CHECKED_AT)

    assert not verdict.satisfied
    assert verdict.problems[0].startswith(f"the staging release(s) of image {PROMOTED_DIGEST} did not succeed: run r2 ended "
                                          f"rollback_incomplete at ")
    assert "(2 attempt(s) in all)" in verdict.problems[0]


def test_promotion_refuses_evidence_older_than_the_environments_limit_and_says_how_old():
    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [evidence(hours_ago=PRODUCTION.evidence_max_age_hours + 5)],
                                       CHECKED_AT)

    assert not verdict.satisfied
    assert verdict.problems == [f"the newest successful staging release of image {PROMOTED_DIGEST}, run run-1, is 173 hours "
                                f"old; the limit is 168 hours (environments.production.evidence_max_age_hours): "
                                f"release it to staging again"]


def test_promotion_names_each_migration_and_data_migration_whose_checksum_differs():
    changed = evidence()
    changed["migrations"]["4"]["up"] = "f" * 64
    changed["data_migrations"]["backfill"] = "e" * 64

    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [changed], CHECKED_AT)

    assert not verdict.satisfied
    assert [p.split(": ", 1)[1] for p in verdict.problems] == [
        f"migration 004_m's checksum differs (up file): {'up4' * 4} now, ffffffffffff in staging (the file changed "
        f"after staging released it)",
        "data migration backfill's checksum differs: dddddddddddd now, eeeeeeeeeeee in staging"]


def test_promotion_names_a_migration_that_staging_did_not_release():
    behind = evidence(schema_version=3)
    del behind["migrations"]["4"]

    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [behind], CHECKED_AT)

    assert [p.split(": ", 1)[1] for p in verdict.problems] == [
        "staging released schema version 3, this release targets 4",
        "migration 004_m is not part of what staging released"]


def test_promotion_takes_an_older_release_that_matches_when_the_newest_does_not():
    changed = evidence("new")
    changed["migrations"]["2"]["down"] = "0" * 64

    verdict = checks.promotion_verdict(PRODUCTION, WANTED, [changed, evidence("older", hours_ago=30)], CHECKED_AT)

    assert verdict.satisfied and verdict.evidence["run_id"] == "older"


def test_promotion_of_an_image_without_a_digest_cannot_be_matched():
    unknown = checks.Fingerprint(None, 4, WANTED.migrations, WANTED.data_migrations)

    verdict = checks.promotion_verdict(PRODUCTION, unknown, [evidence()], CHECKED_AT)

    assert not verdict.satisfied and "the digest of the image is unknown" in verdict.problems[0]


def test_the_promotion_summary_names_the_evidence_or_the_override_and_what_was_missing():
    found = {"promote_from": "staging", "evidence": evidence("run-9"), "problems": [], "overridden": False}
    assert checks.promotion_summary(found).startswith(
        f"Evidence: the staging release run run-9 released image {PROMOTED_DIGEST} (tag 1.2.0) at ")
    overridden = {"promote_from": "staging", "evidence": None, "rule": "r", "overridden": True,
                  "override_reason": "incident 4711", "problems": ["no release of image x in staging"]}
    assert checks.promotion_summary(overridden) == (
        "NO EVIDENCE from staging: the promotion rule (r) was OVERRIDDEN because: incident 4711. Missing:\n"
        "- no release of image x in staging")
    assert checks.promotion_summary(None) is None


def test_the_fingerprint_holds_every_migration_up_to_the_target_and_every_data_spec():
    fingerprint = checks.fingerprint(CATALOG, "billing-service", PROMOTED_DIGEST, 3)

    assert fingerprint.schema_version == 3 and sorted(fingerprint.migrations) == ["1", "2", "3"]
    assert fingerprint.migrations["3"]["name"] == "003_create_payments"
    assert len(str(fingerprint.migrations["3"]["up"])) == 64
    assert list(fingerprint.data_migrations) == ["backfill_invoice_due_dates"]
    assert checks.fingerprint(CATALOG, "billing-service", PROMOTED_DIGEST, None).schema_version == 4


# --- validate_manifest ---------------------------------------------------------------------------------------------


def test_a_valid_manifest_is_returned_as_given():
    manifest = {"auth-service": "1.4.0", "billing-service": "v2_rc-1", "notification-service": "a" * 128}

    assert validate_manifest(manifest, CATALOG.names) == manifest


@pytest.mark.parametrize("manifest", [{}, [], None, "auth-service=1.4.0", [["auth-service", "1.4.0"]]])
def test_an_empty_or_non_object_manifest_is_refused_with_an_example(manifest):
    with pytest.raises(Refused) as raised:
        validate_manifest(manifest, CATALOG.names)

    assert str(raised.value) == ("param 'manifest' must be a non-empty object mapping service names to image tags, "
                                 'e.g. {"auth-service": "1.4.0"}')


def test_an_unknown_service_is_refused_naming_the_known_ones():
    with pytest.raises(Refused) as raised:
        validate_manifest({"auth-service": "1.4.0", "search-service": "2.0.0"}, CATALOG.names)

    assert str(raised.value) == ("param 'manifest': unknown service 'search-service'; known services: auth-service, "
                                 "billing-service, notification-service")


@pytest.mark.parametrize("tag", ["", "-1.4.0", ".hidden", "1.4.0 beta", "1.4.0:latest", "1.4/0", "a" * 129, "é1",
                                 1.4, None])
def test_an_invalid_tag_is_refused_naming_the_tag_the_service_and_the_rule(tag):
    with pytest.raises(Refused) as raised:
        validate_manifest({"auth-service": "1.4.0", "billing-service": tag}, CATALOG.names)

    assert str(raised.value) == (f"param 'manifest': image tag {tag!r} of billing-service is not a valid tag "
                                 f"(letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 "
                                 f"(e.g. 1.4.2))")


# --- target_image --------------------------------------------------------------------------------------------------

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
RUNNING_TASK_DEFINITION = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:7"
DIGEST = "sha256:" + "cd" * 32


class FakeEcs:
    """Stands in for EcsDeploymentHook.live_revision: answers with ``running_image``, or raises ``error``."""

    def __init__(self, running_image: str = f"{ECR}/omnisphere/auth-service:1.4.0",
                 error: Exception | None = None) -> None:
        self.running_image = running_image
        self.error = error
        self.asked: list[tuple[str, str, str]] = []

    def live_revision(self, cluster: str, service: str, container: str) -> LiveRevision:
        self.asked.append((cluster, service, container))
        if self.error:
            raise self.error
        return LiveRevision({"serviceName": service, "taskDefinition": RUNNING_TASK_DEFINITION}, {},
                            self.running_image)


class FakeRegistry:
    """Stands in for ImageRegistryHook.check: answers with ``answer(image)``."""

    def __init__(self, answer=lambda image: ImageCheck(image, checked=True, digest=DIGEST,
                                                       pushed_at="2026-11-20T10:00:00+00:00")) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def check(self, image: str) -> ImageCheck:
        self.asked.append(image)
        return self.answer(image)


def test_the_target_image_is_the_tag_in_the_running_images_repository_checked_in_its_registry():
    ecs, registry = FakeEcs(), FakeRegistry()

    target = target_image(AUTH, "1.5.0", ecs=ecs, registry=registry)

    assert ecs.asked == [(AUTH.ecs.cluster, AUTH.ecs.service, AUTH.ecs.container)]
    assert registry.asked == [f"{ECR}/omnisphere/auth-service:1.5.0"]
    assert target.service == "auth-service"
    assert target.image == f"{ECR}/omnisphere/auth-service:1.5.0"
    assert target.running_task_definition == RUNNING_TASK_DEFINITION
    assert target.running_image == f"{ECR}/omnisphere/auth-service:1.4.0"
    assert target.problem is None
    assert target.describe() == (f"image {ECR}/omnisphere/auth-service:1.5.0 is in ECR: digest {DIGEST}, pushed "
                                 f"2026-11-20T10:00:00+00:00")


def test_the_target_image_of_a_service_running_a_digest_is_the_tag_not_the_digest():
    ecs, registry = FakeEcs(running_image=f"{ECR}/omnisphere/auth-service@{DIGEST}"), FakeRegistry()

    target = target_image(AUTH, "1.5.0", ecs=ecs, registry=registry)

    assert target.image == f"{ECR}/omnisphere/auth-service:1.5.0"
    assert registry.asked == [f"{ECR}/omnisphere/auth-service:1.5.0"]


def test_an_image_missing_from_its_registry_is_the_targets_problem():
    missing = f"image {ECR}/omnisphere/auth-service:1.5.0 is not in ECR repository omnisphere/auth-service"
    registry = FakeRegistry(lambda image: ImageCheck(image, checked=True, problem=missing))

    target = target_image(AUTH, "1.5.0", ecs=FakeEcs(), registry=registry)

    assert target.problem == missing
    assert target.describe() == missing


def test_an_image_outside_ecr_is_not_a_problem_but_says_it_was_not_checked():
    registry = FakeRegistry(lambda image: ImageCheck(image, checked=False))

    target = target_image(AUTH, "1.5.0", ecs=FakeEcs(running_image="ghcr.io/omnisphere/auth:1.4.0"), registry=registry)

    assert target.image == "ghcr.io/omnisphere/auth:1.5.0"
    assert target.problem is None
    assert target.describe() == ("image ghcr.io/omnisphere/auth:1.5.0 is not in ECR: its registry is not checked; "
                                 "ECS fails the deployment (and the release rolls back) if it cannot pull it")


def test_a_service_that_cannot_be_read_raises_before_the_registry_is_asked():
    registry = FakeRegistry()
    ecs = FakeEcs(error=EcsDeploymentError("describe service omnisphere/auth-service: AccessDenied"))

    with pytest.raises(EcsDeploymentError, match="AccessDenied"):
        target_image(AUTH, "1.5.0", ecs=ecs, registry=registry)

    assert registry.asked == []


# --- manifest_images -----------------------------------------------------------------------------------------------


def test_every_image_of_a_manifest_is_checked_and_every_problem_reported(monkeypatch):
    asked: list[tuple[str, str]] = []

    def fake_target_image(service: Service, tag: str, ecs: Any = None, registry: Any = None) -> TargetImage:
        asked.append((service.name, tag))
        if service.name == "notification-service":
            raise EcsDeploymentError("describe service omnisphere/notification-service: ServiceNotFound")
        image = f"{ECR}/omnisphere/{service.name}:{tag}"
        problem = f"image {image} is not in ECR" if service.name == "billing-service" else None
        live = LiveRevision({"taskDefinition": RUNNING_TASK_DEFINITION}, {}, f"{ECR}/omnisphere/{service.name}:1")
        return TargetImage(service.name, live, image, ImageCheck(image, checked=True, problem=problem, digest=DIGEST))

    monkeypatch.setattr(checks, "target_image", fake_target_image)
    manifest = {"notification-service": "3.0.0", "billing-service": "2.0.0", "auth-service": "1.5.0"}

    images, problems = manifest_images(CATALOG, manifest)

    # All three are checked, in the manifest's order: a problem with the first does not hide the others.
    assert asked == [("notification-service", "3.0.0"), ("billing-service", "2.0.0"), ("auth-service", "1.5.0")]
    assert [(i.service, i.image) for i in images] == [("auth-service", f"{ECR}/omnisphere/auth-service:1.5.0")]
    assert problems == [
        "notification-service: describe service omnisphere/notification-service: ServiceNotFound",
        f"billing-service: image {ECR}/omnisphere/billing-service:2.0.0 is not in ECR",
    ]


def test_a_manifest_whose_images_are_all_found_has_no_problem(monkeypatch):
    def fake_target_image(service: Service, tag: str, ecs: Any = None, registry: Any = None) -> TargetImage:
        image = f"{ECR}/omnisphere/{service.name}:{tag}"
        return TargetImage(service.name, LiveRevision({"taskDefinition": "td"}, {}, image), image,
                           ImageCheck(image, checked=True, digest=DIGEST))

    monkeypatch.setattr(checks, "target_image", fake_target_image)

    images, problems = manifest_images(CATALOG, {"auth-service": "1.5.0", "billing-service": "2.0.0"})

    assert problems == []
    assert [i.service for i in images] == ["auth-service", "billing-service"]


@pytest.mark.parametrize("window", ["2026-12-06T25:00+01:00", "2026-02-30T02:00Z", "next\n", "now\n",
                                    "2026-12-06T02:00:00+01:00\n"])
def test_a_window_of_the_right_shape_that_is_no_real_time_is_refused_naming_the_param(window):
    with pytest.raises(Refused, match="param window"):
        decide_window(SCHEDULE, window, "a reason", at("2026-11-25T12:00:00+00:00"))


@pytest.mark.parametrize("tag", ["1.1.0\n", "1.1.0\n\n", " 1.1.0", "1.1.0 "])
def test_a_manifest_tag_with_a_newline_or_a_space_is_refused(tag):
    # Python's $ also matches before a final newline: "1.1.0\n" must not reach a task definition.
    with pytest.raises(Refused, match="not a valid tag"):
        validate_manifest({"auth-service": tag}, CATALOG.names)


def test_the_release_form_refuses_a_tag_with_a_final_newline():
    from airflow.sdk.definitions.param import ParamValidationError

    from omnisphere_release.dags.release import release_params

    image_tag = release_params(CATALOG.get("auth-service"), CATALOG)["image_tag"]
    assert image_tag.resolve("1.1.0") == "1.1.0"
    with pytest.raises(ParamValidationError):
        image_tag.resolve("1.1.0\n")


# --- Four eyes, on the record ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("decision", "refused"), [
    (None, True),  # approve_release marked success by hand: it returned nothing
    ({"outcome": "approved", "approved_by": None}, True),
    ({"outcome": "rejected", "rejected_by": "bob"}, True),
    ({"outcome": "approved", "approved_by": "identity-lead"}, False),
    ({"outcome": "not_required"}, False),  # a dry run
])
def test_production_changes_nothing_without_an_approvers_answer_on_record(decision, refused):
    problem = checks.approval_problem(CATALOG.environment("production"), decision)
    assert (problem is not None) is refused
    if refused:
        assert "requires an approver's answer" in problem and "nothing was changed" in problem


def test_staging_needs_no_approval():
    assert checks.approval_problem(CATALOG.environment("staging"), None) is None


# --- The rehearsal in the window estimate, and the report's Changes ---------------------------------------------
def released(total_seconds: float, database_seconds: float) -> dict[str, Any]:
    return {"outcome": "released", "stages": [{"stage": "schema_up", "seconds": database_seconds},
                                              {"stage": "ecs_deploy", "seconds": total_seconds - database_seconds}]}


def test_a_rehearsal_of_these_migrations_replaces_the_database_stages_of_the_estimate():
    auth = CATALOG.get("auth-service")
    history = [released(600, 60)] * 3  # 10 min, 1 of them migrating
    rehearsal = {"outcome": "passed", "run_id": "manual__r", "environment": "production", "release_minutes": 45,
                 "migrations": {"steps": [{"version": 4}]}}
    assert checks.rehearsal_for([rehearsal], [4]) is rehearsal
    estimate = checks.estimate_duration(auth, history, rehearsal=rehearsal)
    assert estimate.minutes == pytest.approx(10 - 1 + 45)  # the big table's rewrite, measured on a copy
    assert "rehearsed on a copy of production by manual__r: 45.0 min" in estimate.source


@pytest.mark.parametrize("rehearsal", [
    {"outcome": "failed", "migrations": {"steps": [{"version": 4}]}},  # a failed rehearsal measured nothing useful
    {"outcome": "passed", "migrations": {"steps": [{"version": 4}, {"version": 5}]}},  # other migrations
])
def test_a_rehearsal_of_other_migrations_or_a_failed_one_is_not_used(rehearsal):
    assert checks.rehearsal_for([rehearsal], [4]) is None


def test_the_changes_name_each_migration_by_its_first_comment_and_the_ticket_of_the_reason():
    from omnisphere_release.migrations import discover

    pending = [m for m in discover(CATALOG.migrations_dir("auth-service")) if m.version == 4]
    changes = checks.changes_of(pending, [], "repo/auth-service:1.0.0", "repo/auth-service:1.1.0", "sha256:ab",
                                "OPS-42: last login for dormant accounts")
    assert changes["migrations"] == [{"version": 4, "name": "users_last_login", "description":
                                      "Remember the last sign-in, and find dormant accounts without locking the users "
                                      "table for writes."}]
    assert changes["tickets"] == ["OPS-42"] and changes["image"]["after_digest"] == "sha256:ab"


def test_an_approved_plan_holds_only_while_the_service_is_as_preflight_saw_it():
    from omnisphere_release.checks import changed_since_plan

    plan = {"previous_task_definition": "arn:td/auth-service:7", "schema_version": 3}
    assert changed_since_plan(plan, "arn:td/auth-service:7", 3, deployment_in_progress=False) is None
    hotfix = changed_since_plan(plan, "arn:td/auth-service:8", 3, deployment_in_progress=True)
    assert hotfix == "it ran arn:td/auth-service:7 and runs arn:td/auth-service:8 now; an ECS deployment of it is in " \
                     "progress"
    assert changed_since_plan(plan, "arn:td/auth-service:7", 4, deployment_in_progress=False) == \
        "its schema was at version 3 and is at 4 now"
