"""The factory of ``release_all``: release a manifest (service -> image tag) in depends_on order.

Each service is released by its own ``release_<service>`` run (its own backup, rollback and report), triggered and
waited for without holding a worker slot. The first failure stops the chain: that service rolled itself back, the
services released before it stay released, the ones after it are not attempted, and the summary says which is which.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, TriggerRule, Variable, task
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Catalog
from omnisphere_release.operators.common import run_task_states
from omnisphere_release.release_dag import IMAGE_TAG_PATTERN


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


def build_release_all_dag(catalog: Catalog, dag_id: str = "release_all", schedule: Any = None) -> DAG:
    order = [service.name for service in catalog.release_order()]
    with DAG(
        dag_id=dag_id,
        description="Release several services in depends_on order, stopping at the first failure",
        doc_md=__doc__ + f"\n\nRelease order: {' -> '.join(order)}.",
        schedule=schedule,
        catchup=False,
        max_active_runs=1,
        # Templates render as text: native rendering would turn an image tag like 1.10 into the float 1.1.
        render_template_as_native_obj=False,
        tags=["omnisphere", "release"],
        default_args={"owner": "platform", "retries": 1, "retry_delay": timedelta(seconds=20)},
        params={
            "manifest": Param({}, type="object", description='Service -> image tag, e.g. {"auth-service": "1.4.0"}.'),
            "reason": Param("", type="string", maxLength=500, description="Why; passed to every release."),
            "staging_rehearsed": Param(False, type="boolean", description="The manifest went through staging."),
        },
    ) as dag:

        @task(retries=0)
        def check_manifest(params: dict[str, Any] | None = None) -> list[str]:
            """Refuse an unknown service, a bad tag or a skipped staging rehearsal before any release starts."""
            assert params is not None
            try:
                manifest = validate_manifest(params["manifest"], order)
            except ValueError as exc:
                raise AirflowFailException(str(exc)) from None
            if Variable.get("omni_environment", default="production") == "production" and not params.get("staging_rehearsed"):
                raise AirflowFailException("the checklist requires a staging rehearsal in production: release the "
                                           "manifest on staging first, then set param staging_rehearsed")
            chosen = [name for name in order if name in manifest]
            print(f"Releasing in this order: {', '.join(f'{s} {manifest[s]}' for s in chosen)}")
            return chosen

        previous: Any = check_manifest()
        releases = []
        for name in order:

            @task.short_circuit(task_id=f"include_{name}", ignore_downstream_trigger_rules=False,
                                trigger_rule=TriggerRule.NONE_FAILED, retries=0)
            def include(service: str = name, params: dict[str, Any] | None = None) -> bool:
                """Release this service only if the manifest names it."""
                assert params is not None
                return service in params["manifest"]

            gate = include()
            release = TriggerDagRunOperator(
                task_id=f"release_{name}",
                trigger_dag_id=f"release_{name}",
                trigger_run_id=f"{{{{ run_id }}}}__{name}",
                conf={"image_tag": f"{{{{ params.manifest['{name}'] }}}}",
                      "reason": "{{ 'release_all ' ~ run_id ~ ': ' ~ params.reason }}",
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
            manifest = context["params"]["manifest"] if isinstance(context["params"]["manifest"], dict) else {}
            outcome = {}
            for name in order:
                if name not in manifest:
                    continue
                state = states.get(f"release_{name}", "none")
                outcome[name] = {"success": "released", "failed": "failed and rolled back (see its release run)",
                                 }.get(state, "not attempted (an earlier release failed)")
            for name, text in outcome.items():
                print(f"{name} {manifest[name]}: {text}")
            if any(text.startswith("failed") for text in outcome.values()) or states.get("check_manifest") == "failed":
                raise AirflowFailException(f"release_all stopped: {outcome or 'the manifest was refused'}")
            return outcome

        releases >> summary()
    return dag
