"""One-off ECS tasks (RunTask) in the devstack's moto: each catalog service's regression suite, acted out.

moto starts a RunTask task RUNNING and walks it to STOPPED over the next DescribeTasks calls, always with exit code 0,
and writes no logs. A regression suite run by ECS goes PENDING -> RUNNING -> STOPPED as the suite runs, its container
exits with the suite's result, and the awslogs driver writes its output to CloudWatch Logs. ``install`` patches moto's ECS backend so that every
RunTask task does that, one step every ``step_seconds``:

- PENDING for one step, then RUNNING while the suite "runs": it writes its lines to the log group and stream prefix of
  its container's ``logConfiguration`` (awslogs), the stream ``<prefix>/<container>/<task id>`` as ECS names it;
- STOPPED one step after its last line, with ``stopCode`` EssentialContainerExited and the container's exit code.

The suite runs against the image under test: the ``OMNI_RELEASE_IMAGE`` environment override that regression_test
passes (a digest reference resolves to the tag it was pushed as, devstack/ecr.py), else the container's own image. A
tag ending ``-regressions`` fails it (exit code 1, with failing-test lines); any other tag passes (exit code 0). It
also asks ``OMNI_SERVICE_URL``/version, as a real suite's first test would, and fails when nothing answers there.
StopTask stops a task at once (exit code 137, as a SIGKILL after ECS's stop timeout).

``install`` also registers each catalog service's suite (``regression.task_definition``) as a task definition: one
account, so both environments' clusters run the same family. State advances when it is read (DescribeTasks,
ListTasks), not on a timer: what a client sees is what it would have seen.
Test infrastructure: plugins/ and dags/ never import it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moto.ecs import models as ecs_models
from moto.logs import models as logs_models
from moto.logs.exceptions import ResourceAlreadyExistsException

from devstack.aws import ACCOUNT, IMAGE_REPOSITORY, INITIAL_TAG, REGION
from devstack.ecs_simulator import image_tag

REGRESSIONS_SUFFIX = "-regressions"
# The names regression_test gives the suite's container (plugins/omnisphere_release/operators/regression.py).
IMAGE_UNDER_TEST = "OMNI_RELEASE_IMAGE"
SERVICE_URL = "OMNI_SERVICE_URL"
STREAM_PREFIX = "regression"  # the awslogs-stream-prefix of every suite task definition the devstack registers
EXIT_KILLED = 137

# The acted-out suite: (test name, whether it fails against a -regressions image).
SUITE = (("test_health_and_readiness", False), ("test_sign_in_round_trip", True),
         ("test_list_pagination_is_stable", False), ("test_write_then_read_back", True))
FAILURES = {"test_sign_in_round_trip": "AssertionError: expected 200, got 500 from POST /sessions",
            "test_write_then_read_back": "AssertionError: read back 0 rows, wrote 3"}

_lock = threading.RLock()
_installed = False


def log_group_of(service: Any) -> str:
    """Return the log group of ``service``'s suite: the group its catalog names for its tasks' logs, ``/ecs/<name>``
    by default (the convention the sample services write to)."""
    logs = service.monitoring.logs
    return logs.log_group if logs is not None else f"/ecs/{service.name}"


@dataclass
class SuiteRun:
    """One RunTask task, as the devstack acts it out."""

    task: Any  # moto's Task
    container: str
    image: str  # the image under test
    url: str | None
    log_group: str | None
    log_stream: str | None
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)  # planned, written one per step while RUNNING
    written: int = 0
    exit_code: int | None = None
    stopped: bool = False


class OneOffTaskSimulator:
    """Patch moto's ECS backend so that RunTask tasks run a regression suite and stop by themselves."""

    def __init__(self, step_seconds: float = 0.3) -> None:
        self.step_seconds = step_seconds
        self.runs: dict[str, SuiteRun] = {}  # by task ARN

    def install(self, catalog: Any) -> None:
        """Patch RunTask, DescribeTasks, ListTasks and StopTask, and register the catalog's suites (the patch once per
        process: a second stack in the same process registers its suites, as ecr.install does)."""
        global _installed
        with _lock:
            if not _installed:
                _installed = True
                self._patch()
        register_suites(catalog)

    def _patch(self) -> None:
        simulator = self
        backend_cls = ecs_models.EC2ContainerServiceBackend
        original_run, original_describe = backend_cls.run_task, backend_cls.describe_tasks
        original_list, original_stop = backend_cls.list_tasks, backend_cls.stop_task

        def run_task(backend: Any, *args: Any, **kwargs: Any) -> Any:
            tasks = original_run(backend, *args, **kwargs)
            with _lock:
                for task in tasks:
                    simulator.start(backend, task)
            return tasks

        def describe_tasks(backend: Any, *args: Any, **kwargs: Any) -> Any:
            tasks = original_describe(backend, *args, **kwargs)
            with _lock:
                for task in tasks:
                    simulator.advance(task.task_arn)
            return tasks

        def list_tasks(backend: Any, *args: Any, **kwargs: Any) -> Any:
            with _lock:
                for arn in list(simulator.runs):
                    simulator.advance(arn)
            return original_list(backend, *args, **kwargs)

        def stop_task(backend: Any, cluster_str: str, task_str: str, reason: str) -> Any:
            task = original_stop(backend, cluster_str, task_str, reason)
            with _lock:
                simulator.kill(task.task_arn, reason)
            return task

        backend_cls.run_task, backend_cls.describe_tasks = run_task, describe_tasks
        backend_cls.list_tasks, backend_cls.stop_task = list_tasks, stop_task

    # ---- one task's life ----------------------------------------------------------------------------------------
    def start(self, backend: Any, task: Any) -> None:
        task_definition = backend.describe_task_definition(task.task_definition_arn)
        definition = task_definition.container_definitions[0]
        environment = {e["name"]: e["value"] for e in definition.get("environment") or []}
        for override in (task.overrides or {}).get("containerOverrides") or []:
            if override.get("name") == definition["name"]:
                environment.update({e["name"]: e["value"] for e in override.get("environment") or []})
        options = (definition.get("logConfiguration") or {}).get("options") or {}
        group, prefix = options.get("awslogs-group"), options.get("awslogs-stream-prefix")
        run = SuiteRun(task=task, container=definition["name"], image=environment.get(IMAGE_UNDER_TEST)
                       or definition.get("image", ""), url=environment.get(SERVICE_URL), log_group=group,
                       log_stream=f"{prefix}/{definition['name']}/{task.id}" if group and prefix else None)
        task._transitions = []  # moto's own lifecycle (RUNNING, then STOPPED on the next describe) is replaced here
        task.last_status, task.desired_status = "PENDING", "RUNNING"
        task.created_at = _now()
        for container in task.containers:
            container.last_status, container.exitCode = "PENDING", None
        self.runs[task.task_arn] = run

    def advance(self, arn: str) -> None:
        run = self.runs.get(arn)
        if run is None or run.stopped:
            return
        steps = int((time.monotonic() - run.started) / self.step_seconds)
        if steps < 1:
            return
        if run.task.last_status == "PENDING":
            self._begin(run)
        # One line per step; STOPPED one step after the last line, so a reader polling logs and state sees every
        # line before it sees the task stop.
        while run.written < min(len(run.lines), steps - 1):
            self._write(run, [run.lines[run.written]])
            run.written += 1
        if run.written == len(run.lines) and steps - 1 > len(run.lines):
            self._stop(run, run.exit_code or 0, "EssentialContainerExited", "Essential container in task exited")

    def _begin(self, run: SuiteRun) -> None:
        run.task.last_status = "RUNNING"
        run.task.started_at = _now()
        for container in run.task.containers:
            container.last_status = "RUNNING"
        run.lines, run.exit_code = suite_lines(run.image, run.url)

    def kill(self, arn: str, reason: str) -> None:
        run = self.runs.get(arn)
        if run is not None and not run.stopped:
            self._write(run, [f"suite stopped before it finished: {reason or 'StopTask'}"])
            self._stop(run, EXIT_KILLED, "UserInitiated", reason or "Task stopped by user")

    def _stop(self, run: SuiteRun, exit_code: int, stop_code: str, reason: str) -> None:
        run.stopped, run.exit_code = True, exit_code
        task = run.task
        task.last_status, task.desired_status = "STOPPED", "STOPPED"
        task.stop_code, task.stopped_reason = stop_code, reason
        task.stopping_at = task.execution_stopped_at = task.stopped_at = _now()
        for container in task.containers:
            container.last_status, container.exitCode = "STOPPED", exit_code
            container.reason = None if exit_code == 0 else f"exit code {exit_code}"

    def _write(self, run: SuiteRun, lines: list[str]) -> None:
        if not run.log_group or not run.log_stream:
            return  # no awslogs configuration: ECS would keep no output either
        backend = logs_models.logs_backends[ACCOUNT][REGION]
        # The group may exist already (the sample services write theirs there); a task's stream is its own.
        with contextlib.suppress(ResourceAlreadyExistsException):
            backend.create_log_group(run.log_group, {})
        backend.ensure_log_stream(run.log_group, run.log_stream)
        now = int(time.time() * 1000)
        backend.put_log_events(run.log_group, run.log_stream, [{"timestamp": now, "message": line} for line in lines])


def suite_lines(image: str, url: str | None) -> tuple[list[str], int]:
    """Return what the acted-out suite prints against ``image`` at ``url``, and its exit code."""
    tag = image_tag(image) if image else "unknown"
    lines = [f"regression suite: {len(SUITE)} tests against {image or 'an unknown image'} (tag {tag}) at "
             f"{url or 'no URL'}"]
    if url:
        served = _served_version(url)
        lines.append(f"GET {url.rstrip('/')}/version -> {served}")
        if served.startswith("unreachable"):
            lines.append("FAILED: the service did not answer; no test could run")
            lines.append(f"0 passed, {len(SUITE)} errors")
            return lines, 2
    failing = tag.endswith(REGRESSIONS_SUFFIX)
    failed = 0
    for name, fails_on_regressions in SUITE:
        if failing and fails_on_regressions:
            failed += 1
            lines.append(f"FAILED {name} - {FAILURES[name]}")
        else:
            lines.append(f"PASSED {name}")
    passed = len(SUITE) - failed
    lines.append(f"{failed} failed, {passed} passed" if failed else f"{passed} passed")
    return lines, 1 if failed else 0


def _served_version(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/version", timeout=2) as answer:  # noqa: S310 - loopback
            body = json.loads(answer.read() or b"{}")
            return f"{answer.status} image {body.get('image')}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code}"
    except (OSError, ValueError) as exc:
        return f"unreachable ({exc})"


def register_suites(catalog: Any) -> list[str]:
    """Register each catalog service's regression suite as an ECS task definition; return their ARNs.

    Its container logs with the awslogs driver to the service's log group, stream prefix ``regression``.
    """
    backend = ecs_models.ecs_backends[ACCOUNT][REGION]
    arns = []
    for service in catalog.services:
        suite = service.regression
        if suite is None:
            continue
        definition = backend.register_task_definition(
            family=suite.task_definition.split(":")[0],
            container_definitions=[{
                "name": suite.container,
                "image": f"{IMAGE_REPOSITORY}/{service.name}-regression:{INITIAL_TAG}",
                "essential": True,
                "cpu": 256,
                "memory": 512,  # moto sizes a task from its containers' memory
                "environment": [{"name": "OMNI_SERVICE", "value": service.name}],
                "logConfiguration": {"logDriver": "awslogs", "options": {
                    "awslogs-group": log_group_of(service), "awslogs-region": REGION,
                    "awslogs-stream-prefix": STREAM_PREFIX, "awslogs-create-group": "true"}},
            }],
            # The devstack's services have no VPC, so their suites have the bridge network (moto would require a
            # network configuration for awsvpc, which a FARGATE task definition implies). In AWS a suite runs in
            # awsvpc mode, in the service's subnets: regression_test passes the service's network configuration.
            network_mode="bridge",
            cpu="256",
            memory="512",
        )
        arns.append(definition.arn)
    return arns


def _now() -> datetime:
    return datetime.now(timezone.utc)


SIMULATOR = OneOffTaskSimulator()


def install(catalog: Any, step_seconds: float | None = None) -> OneOffTaskSimulator:
    """Install the one-off task simulator into moto's ECS backend and register the catalog's suites."""
    if step_seconds is not None:
        SIMULATOR.step_seconds = step_seconds
    SIMULATOR.install(catalog)
    return SIMULATOR
