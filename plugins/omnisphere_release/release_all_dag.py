"""The factory of ``release_all``: release a manifest (service -> image tag) in depends_on order.

Each service is released by its own ``release_<service>`` run (its own backup, rollback and report), triggered and
waited for without holding a worker slot. The first failure stops the chain: that service rolled itself back, the
services released before it stay released, the ones after it are not attempted, and the summary says which is which.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, TriggerRule, Variable, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Catalog
from omnisphere_release.operators.common import run_task_states
from omnisphere_release.params import IMAGE_TAG_PATTERN, optional_text
from omnisphere_release.release_queue import QUEUE_VARIABLE, queue_manifest, resolve_window, take_manifest, window_key
from omnisphere_release.timetables import MaintenanceWindowTimetable


def validate_manifest(manifest: Any, known: list[str]) -> dict[str, str]:
    """Return the manifest if every service is known and every tag valid; raise ValueError naming the entry."""
    if not isinstance(manifest, dict) or not manifest:
        raise ValueError("param 'manifest' must be a non-empty object mapping service names to image tags, "
                         'e.g. {"auth-service": "1.4.0"}')
    for service, tag in manifest.items():
        if service not in known:
            raise ValueError(f"param 'manifest': unknown service {service!r}; known services: {', '.join(known)}")
        if not isinstance(tag, str) or not re.match(IMAGE_TAG_PATTERN, tag):
            raise ValueError(f"param 'manifest': image tag {tag!r} of {service} is not a valid tag "
                             f"({IMAGE_TAG_PATTERN})")
    return manifest


def manifest_image_problems(catalog: Catalog, manifest: dict[str, str]) -> list[str]:
    """Return why images of the manifest cannot be released (not pushed, registry unreachable), checked before the
    first release starts: otherwise the services before the missing image are released and the window is spent."""
    from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook, image_of, with_image
    from omnisphere_release.hooks.registry import ImageRegistryHook

    problems = []
    for name, tag in manifest.items():
        service = catalog.get(name)
        try:
            ecs = EcsDeploymentHook(service.aws_conn_id)
            current = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            image = image_of(ecs.describe_task_definition(current["taskDefinition"]), service.ecs.container)
        except EcsDeploymentError as exc:
            problems.append(f"{name}: {exc}")
            continue
        check = ImageRegistryHook(service.aws_conn_id).check(with_image(image, tag))
        if check.problem:
            problems.append(f"{name}: {check.problem}")
        else:
            print(f"{name}: image {check.image} " + (f"is in ECR ({check.digest})" if check.checked
                                                     else "is not in ECR: not checked"))
    return problems


def build_release_all_dag(catalog: Catalog, dag_id: str = "release_all") -> DAG:
    order = [service.name for service in catalog.release_order()]
    w = catalog.release_all_window
    schedule = MaintenanceWindowTimetable(w.cron, w.duration_minutes, w.timezone) if w else None
    with DAG(
        dag_id=dag_id,
        description="Release several services in depends_on order, stopping at the first failure",
        doc_md=__doc__ + f"\n\nRelease order: {' -> '.join(order)}.",
        schedule=schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        # Templates render as text: native rendering would turn an image tag like 1.10 into the float 1.1.
        render_template_as_native_obj=False,
        tags=["omnisphere", "release"],
        default_args={"owner": "platform", "retries": 1, "retry_delay": timedelta(seconds=20)},
        params={
            "manifest": Param({}, type="object", description='Service -> image tag, e.g. {"auth-service": "1.4.0"}.'),
            "reason": optional_text("Why; passed to every release."),
            "staging_rehearsed": Param(False, type="boolean", description="The manifest went through staging."),
        },
    ) as dag:

        @task(retries=0)
        def check_manifest(**context: Any) -> dict[str, Any]:
            """Take the manifest (queued for this window, or given as a param), refuse an unknown service, a bad tag,
            an image that is not in its registry or a skipped staging rehearsal before any release starts."""
            params, dag_run = context["params"], context["dag_run"]
            entry = {"manifest": params["manifest"], "reason": params.get("reason") or "",
                     "staging_rehearsed": params.get("staging_rehearsed", False)}
            if str(getattr(dag_run, "run_type", "")).lower().endswith("scheduled"):
                queue = Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True)
                start = context["data_interval_start"]
                queued, rest = take_manifest(queue, start)
                Variable.set(QUEUE_VARIABLE, rest, serialize_json=True)
                if not queued:
                    raise AirflowSkipException(f"Nothing queued for the window starting {window_key(start)}; "
                                               f"nothing to release.")
                entry = queued
                print(f"Took the manifest queued for the window starting {window_key(start)}: {entry}")
            try:
                manifest = validate_manifest(entry["manifest"], order)
            except ValueError as exc:
                raise AirflowFailException(str(exc)) from None
            problems = manifest_image_problems(catalog, manifest)
            if problems:
                raise AirflowFailException("Refused the manifest before any release started; nothing was changed:\n"
                                           + "\n".join(f"  - {p}" for p in problems))
            if Variable.get("omni_environment", default="production") == "production" \
                    and not entry.get("staging_rehearsed"):
                raise AirflowFailException("the checklist requires a staging rehearsal in production: release the "
                                           "manifest on staging first, then set param staging_rehearsed")
            chosen = [name for name in order if name in manifest]
            print(f"Releasing in this order: {', '.join(f'{s} {manifest[s]}' for s in chosen)}")
            return {"order": chosen, "manifest": manifest, "reason": entry.get("reason", "")}

        previous: Any = check_manifest()
        releases = []
        for name in order:

            @task.short_circuit(task_id=f"include_{name}", ignore_downstream_trigger_rules=False,
                                trigger_rule=TriggerRule.NONE_FAILED, retries=0)
            def include(service: str = name, ti: Any = None) -> bool:
                """Release this service only if the manifest names it."""
                return service in (ti.xcom_pull(task_ids="check_manifest") or {}).get("manifest", {})

            gate = include()
            release = TriggerDagRunOperator(
                task_id=f"release_{name}",
                trigger_dag_id=f"release_{name}",
                trigger_run_id=f"{{{{ run_id }}}}__{name}",
                conf={"image_tag": f"{{{{ ti.xcom_pull(task_ids='check_manifest')['manifest']['{name}'] }}}}",
                      "reason": "{{ 'release_all ' ~ run_id ~ ': ' ~ ti.xcom_pull(task_ids='check_manifest')"
                                "['reason'] }}",
                      # release_all itself runs in its window (or was started by a person): its releases go now.
                      "window": "now", "force_reason": "{{ 'part of release_all ' ~ run_id }}"},
                wait_for_completion=True,
                deferrable=True,
                poke_interval=5,
                allowed_states=["success"],
                failed_states=["failed"],
                skip_when_already_exists=True,
                retries=0,
            )
            previous >> gate >> release
            previous = release
            releases.append(release)

        @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
        def summary(**context: Any) -> dict[str, str]:
            """Say which services were released, which failed (and rolled back), which were not attempted."""
            states = run_task_states(context)
            manifest = (context["ti"].xcom_pull(task_ids="check_manifest") or {}).get("manifest", {})
            outcome = {}
            for name in order:
                if name not in manifest:
                    continue
                state = states.get(f"release_{name}", "none")
                outcome[name] = {"success": "released", "failed": "failed and rolled back (see its release run)",
                                 }.get(state, "not attempted (an earlier release failed)")
            for name, text in outcome.items():
                print(f"{name} {manifest[name]}: {text}")
            if states.get("check_manifest") == "skipped":
                print("Nothing was queued for this window: nothing released.")
            if any(text.startswith("failed") for text in outcome.values()) or states.get("check_manifest") == "failed":
                raise AirflowFailException(f"release_all stopped: {outcome or 'the manifest was refused'}")
            return outcome

        releases >> summary()
    return dag


def build_queue_release_dag(catalog: Catalog) -> DAG | None:
    """``queue_release``: queue a manifest for a release_all window (the next one, or a given start)."""
    w = catalog.release_all_window
    if w is None:
        return None
    from omnisphere_release.windows import WindowSchedule

    schedule = WindowSchedule(w.cron, timedelta(minutes=w.duration_minutes), w.timezone)
    order = [service.name for service in catalog.release_order()]
    with DAG(
        dag_id="queue_release",
        description=f"Queue a manifest for release_all in a maintenance window ({schedule.summary()})",
        doc_md=f"""
### queue_release

Queues a manifest (`{{"service": "image tag"}}`) for a **release_all** window ({schedule.summary()}): `next`, or the
ISO 8601 start of a later window. At that window, release_all releases it in depends_on order; a window with nothing
queued releases nothing. Queuing again for the same window replaces the earlier manifest.
""",
        schedule=None,
        catchup=False,
        tags=["omnisphere", "release"],
        default_args={"owner": "platform", "retries": 1},  # queuing again replaces: safe to retry
        params={
            "manifest": Param({}, type="object", description='Service -> image tag, e.g. {"auth-service": "1.4.0"}.'),
            "window": Param("next", type="string", description="next, or the ISO 8601 start of a window."),
            "reason": optional_text("Why; kept with the queued manifest and passed to every release."),
            "staging_rehearsed": Param(False, type="boolean"),
        },
    ) as dag:

        @task
        def queue(**context: Any) -> dict[str, Any]:
            """Validate the manifest, its images and the window, then queue it."""
            params = context["params"]
            try:
                manifest = validate_manifest(params["manifest"], order)
                start = resolve_window(schedule, params["window"], datetime.now(timezone.utc))
            except ValueError as exc:
                raise AirflowFailException(str(exc)) from None
            # Found now, in daylight, rather than when the window opens; release_all checks again then.
            problems = manifest_image_problems(catalog, manifest)
            if problems:
                raise AirflowFailException("Not queued; fix these, then queue the manifest again:\n"
                                           + "\n".join(f"  - {p}" for p in problems))
            entry = {"manifest": manifest, "reason": params["reason"] or "",
                     "staging_rehearsed": params["staging_rehearsed"], "queued_by": context["run_id"]}
            current = Variable.get(QUEUE_VARIABLE, default={}, deserialize_json=True)
            Variable.set(QUEUE_VARIABLE, queue_manifest(current, start, entry), serialize_json=True)
            print(f"Queued for the release_all window starting {window_key(start)}: {manifest}")
            return {"window_start": window_key(start), **entry}

        queue()
    return dag
