"""``omni-release``: trigger and follow releases from CI through Airflow's REST API v2.

    omni-release trigger <service> --image-tag T [--strategy S] [--window now --force-reason R] [--wait]
    omni-release status|logs|report <dag_id>/<run_id>
    omni-release approve|reject <dag_id>/<run_id> [--comment C]
    omni-release calendar [--weeks N] [--tz ZONE] [--json]

The Airflow URL and credentials come from the environment, never the command line (CI logs and `ps` show it):
``OMNI_AIRFLOW_URL`` (e.g. https://airflow.example.com), and ``OMNI_AIRFLOW_TOKEN`` or ``OMNI_AIRFLOW_USERNAME`` +
``OMNI_AIRFLOW_PASSWORD``.

Exit codes: 0 released (or the run succeeded), 1 failed or rolled back, 2 bad input or refused (the API's message is
shown; a 403 names the permission the user lacks), 3 timeout, 4 Airflow cannot be reached or refuses the credentials
(a 401: a wrong password, an expired token), 5 rejected at approval or no approver answered in time (nothing was
changed).

A release in an environment that requires approval (``--environment production``) waits at approve_release: ``status``
and ``trigger --wait`` show "awaiting approval" with the link to the request, and an approver (never the person who
triggered it) answers with ``approve`` or ``reject``, as the user of the credentials above.

httpx rather than apache-airflow-client: one small, typed dependency that CI images already tend to have, and the
few endpoints used here are stable parts of API v2; the generated client pins its own urllib3 and pydantic versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from omnisphere_release.report import render_markdown
from omnisphere_release.ui.calendar import render_text

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_REJECTED = 5  # the run failed at approve_release: rejected, timed out or nobody may approve; nothing changed
APPROVAL_TASK = "approve_release"  # contracts.APPROVE_RELEASE; this module stays importable without Airflow
APPROVAL_OUTCOMES = {"rejected", "approval_timed_out", "no_approver"}  # report.APPROVAL_OUTCOMES' values
FINAL = {"success", "failed"}


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AirflowApi:
    def __init__(self, url: str, token: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=f"{self.url}/api/v2", timeout=timeout)
        try:
            if not token:
                if not username or not password:
                    raise ClientError("set OMNI_AIRFLOW_TOKEN, or OMNI_AIRFLOW_USERNAME and OMNI_AIRFLOW_PASSWORD",
                                      EXIT_UNREACHABLE)
                response = httpx.post(f"{self.url}/auth/token", json={"username": username, "password": password},
                                      timeout=timeout)
                if response.status_code in (401, 403):
                    raise ClientError(f"Airflow at {self.url} refused the credentials of {username!r} "
                                      f"(HTTP {response.status_code})", EXIT_UNREACHABLE)
                response.raise_for_status()
                token = response.json()["access_token"]
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach Airflow at {self.url}: {exc}", EXIT_UNREACHABLE) from None
        self.http.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach Airflow at {self.url}: {exc}", EXIT_UNREACHABLE) from None
        # Airflow answers a token it cannot read with 403 "Invalid JWT token": a credentials problem, as a 401.
        if response.status_code == 401 or (response.status_code == 403 and "invalid jwt" in response.text.lower()):
            raise ClientError(f"Airflow refused the credentials for {method} {path} (HTTP {response.status_code}): "
                              "the token expired or is wrong; check OMNI_AIRFLOW_TOKEN or "
                              "OMNI_AIRFLOW_USERNAME/PASSWORD", EXIT_UNREACHABLE)
        if response.status_code == 403:
            raise ClientError(forbidden_message(method, path, response), EXIT_BAD_INPUT)
        if response.status_code in (400, 404, 409, 422):
            raise ClientError(f"Airflow refused {method} {path} (HTTP {response.status_code}): "
                              f"{_api_message(response)}", EXIT_BAD_INPUT)
        response.raise_for_status()
        return response.json() if response.content else None

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances",
                            params={"limit": 100})["task_instances"]

    def report(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        try:
            entry = self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/report/"
                                        f"xcomEntries/return_value", params={"deserialize": True})
        except ClientError:
            return None
        value = entry.get("value")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        return value if isinstance(value, dict) else None

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        body = self.request("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/logs/"
                                   f"{try_number}", params={"full_content": True},
                            headers={"Accept": "application/json"})
        lines = []
        for item in body.get("content", []) if isinstance(body, dict) else []:
            if isinstance(item, dict):
                event = item.get("event", "")
                if event.startswith("::"):
                    continue
                lines.append(f"{item.get('timestamp', '')} {item.get('level', '')} {event}".strip())
                for error in item.get("error_detail") or []:  # the exception that failed the task: the cause
                    if isinstance(error, dict):
                        lines.append(f"    {error.get('exc_type', 'Exception')}: {error.get('exc_value', '')}")
            else:
                lines.append(str(item))
        return "\n".join(lines)

    def calendar(self, weeks: float) -> dict[str, Any]:
        """The Releases page's calendar (the plugin's app, mounted beside the API at /omnisphere)."""
        try:
            response = self.http.get(f"{self.url}/omnisphere/api/calendar", params={"weeks": weeks})
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach Airflow at {self.url}: {exc}", EXIT_UNREACHABLE) from None
        if response.status_code == 401 or (response.status_code == 403 and "invalid jwt" in response.text.lower()):
            raise ClientError("Airflow refused the credentials for the calendar (HTTP 401)", EXIT_UNREACHABLE)
        if response.status_code == 403:
            raise ClientError(forbidden_message("GET", "/omnisphere/api/calendar", response), EXIT_BAD_INPUT)
        if response.status_code == 404:
            raise ClientError(f"{self.url} has no /omnisphere app: is the omnisphere_release plugin installed in "
                              "its plugins folder?", EXIT_BAD_INPUT)
        if response.status_code == 422:
            raise ClientError(f"--weeks {weeks}: {_api_message(response)}", EXIT_BAD_INPUT)
        response.raise_for_status()
        return dict(response.json())

    def run_url(self, dag_id: str, run_id: str) -> str:
        return f"{self.url}/dags/{dag_id}/runs/{quote(run_id, safe='')}"

    def approval_url(self, dag_id: str, run_id: str) -> str:
        """The approval request's page in the UI (the task's Required Actions)."""
        return f"{self.run_url(dag_id, run_id)}/tasks/{APPROVAL_TASK}/required_actions"

    def _approval_path(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{APPROVAL_TASK}/-1/hitlDetails"

    def approval(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """The run's approval request (subject, body, who may answer, the answer), or None when it has none."""
        try:
            return dict(self.request("GET", self._approval_path(dag_id, run_id)))
        except ClientError as exc:
            if exc.exit_code == EXIT_BAD_INPUT and "HTTP 404" in str(exc):
                return None
            raise

    def answer(self, dag_id: str, run_id: str, option: str, comment: str) -> dict[str, Any]:
        """Answer the run's approval request as the user of the credentials."""
        path = self._approval_path(dag_id, run_id)
        try:
            response = self.http.patch(path, json={"chosen_options": [option], "params_input": {"comment": comment}})
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach Airflow at {self.url}: {exc}", EXIT_UNREACHABLE) from None
        if response.status_code == 403:  # Airflow's own words name the user ("... is not a respondent ...")
            raise ClientError(f"Airflow refused your answer to {dag_id}/{run_id} (HTTP 403: {_api_message(response)}): "
                              "only the service's approvers (include/services.yaml), never the person who triggered "
                              "the release, may answer it", EXIT_BAD_INPUT)
        if response.status_code in (404, 409):
            raise ClientError(f"{dag_id}/{run_id} has no open approval request (HTTP {response.status_code}: "
                              f"{_api_message(response)})", EXIT_BAD_INPUT)
        if response.status_code == 401:
            raise ClientError("Airflow refused the credentials (HTTP 401)", EXIT_UNREACHABLE)
        if response.status_code == 400:
            raise ClientError(f"Airflow refused the answer (HTTP 400): {_api_message(response)}", EXIT_BAD_INPUT)
        response.raise_for_status()
        return dict(response.json())


def _api_message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


def forbidden_message(method: str, path: str, response: httpx.Response) -> str:
    """Say which permission a 403 means: Airflow's own answer is a bare "Forbidden" (a refusal with a reason of its
    own, such as the force-window guard's, is shown as it is). Permissions as the FAB auth manager names them."""
    detail = _api_message(response)
    dag = re.match(r"/dags/([^/]+)(/.*)?$", path)
    if dag and method == "POST" and (dag.group(2) or "") == "/dagRuns":
        needed = f"trigger {dag.group(1)}: can_edit on DAG:{dag.group(1)} and can_create on DAG Runs"
    elif dag and method == "GET":
        needed = f"read {dag.group(1)}: can_read on DAG:{dag.group(1)} (and on DAG Runs, Task Instances, Task Logs)"
    elif dag:
        needed = f"change {dag.group(1)}: can_edit on DAG:{dag.group(1)}"
    else:
        needed = "read the DAGs: can_read on DAGs or on a DAG:<dag_id>"
    reason = "" if detail.strip().lower() in ("", "forbidden") else f" ({detail})"
    return (f"Airflow refused {method} {path} (HTTP 403){reason}: the user lacks the permission to {needed}; "
            "ask for the role that holds it (docs/runbook.md, Roles)")


def follow(api: AirflowApi, dag_id: str, run_id: str, timeout: float, poll: float, out: Any) -> str:
    """Print each task's state as it changes until the run ends; return the final run state."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        for ti in api.task_instances(dag_id, run_id):
            label = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")
            state = ti.get("state") or "none"
            if seen.get(label) != state and state != "none":
                print(f"  {time.strftime('%H:%M:%S')} {label}: {state}", file=out, flush=True)
                if label == APPROVAL_TASK and state == "awaiting_input":
                    print_awaiting_approval(api, dag_id, run_id, out)
                seen[label] = state
        state = api.run(dag_id, run_id)["state"]
        if state in FINAL:
            return state
        if time.monotonic() > deadline:
            raise ClientError(f"{dag_id} run {run_id} still {state} after {timeout:.0f}s; it goes on in Airflow: "
                              f"{api.run_url(dag_id, run_id)}", EXIT_TIMEOUT)
        time.sleep(poll)


def print_awaiting_approval(api: AirflowApi, dag_id: str, run_id: str, out: Any) -> None:
    """Say that the run waits for an approver: where to answer, who may, and until when."""
    request = api.approval(dag_id, run_id) or {}
    who = ", ".join(u.get("name", "?") for u in request.get("assigned_users") or []) or "one of the service's approvers"
    print(f"  awaiting approval by {who} (never the person who triggered it): {api.approval_url(dag_id, run_id)}",
          file=out)
    print(f"    {request.get('subject') or 'approve_release'}; answer there, or: omni-release approve|reject "
          f"{dag_id}/{run_id} --comment '...'", file=out, flush=True)


def final_exit_code(api: AirflowApi, dag_id: str, run_id: str, state: str) -> int:
    """0 when the run succeeded; 5 when it failed at approval (nothing changed); 1 for any other failure."""
    if state == "success":
        return EXIT_OK
    report = api.report(dag_id, run_id) or {}
    if report:
        return EXIT_REJECTED if report.get("outcome") in APPROVAL_OUTCOMES else EXIT_FAILED
    # No report to read (its task failed, or the API could not give it): the task states say as much.
    try:
        states = {ti.get("task_id"): ti.get("state") for ti in api.task_instances(dag_id, run_id)}
    except ClientError:
        return EXIT_FAILED
    ended_at_approval = states.get("approve_release") == "failed" and states.get("backup") in ("upstream_failed", None)
    return EXIT_REJECTED if ended_at_approval else EXIT_FAILED


def answer_approval(api: AirflowApi, dag_id: str, run_id: str, option: str, comment: str, timeout: float,
                    out: Any) -> int:
    """Answer the approval request, then wait until approve_release took the answer (or refused it)."""
    state = {ti["task_id"]: ti.get("state") for ti in api.task_instances(dag_id, run_id)}.get(APPROVAL_TASK)
    if state != "awaiting_input":  # Airflow would record a late answer to a finished request, and do nothing with it
        raise ClientError(f"{dag_id}/{run_id} is not waiting for an approver: approve_release is "
                          f"{state or 'not started'} (see omni-release status {dag_id}/{run_id})", EXIT_BAD_INPUT)
    request = api.approval(dag_id, run_id)
    if request is None:
        raise ClientError(f"{dag_id}/{run_id} has no approval request: it is not waiting for an approver (see "
                          f"omni-release status {dag_id}/{run_id})", EXIT_BAD_INPUT)
    if request.get("response_received"):
        by = (request.get("responded_by_user") or {}).get("name", "someone")
        raise ClientError(f"{dag_id}/{run_id} was already answered: {request.get('chosen_options')} by {by} at "
                          f"{request.get('responded_at')}", EXIT_BAD_INPUT)
    api.answer(dag_id, run_id, option, comment)
    print(f"Answered {option} to {request.get('subject') or dag_id + '/' + run_id}", file=out, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {ti["task_id"]: ti.get("state") for ti in api.task_instances(dag_id, run_id)}
        state = states.get(APPROVAL_TASK)
        if state == "success":
            print(f"Approved: the release goes on ({api.run_url(dag_id, run_id)})", file=out)
            return EXIT_OK
        if state == "failed" and option == "Reject":
            print(f"Rejected: the release ends here, with nothing changed ({api.run_url(dag_id, run_id)})", file=out)
            return EXIT_OK
        if state == "failed":
            raise ClientError(f"approve_release failed after your answer: see its log at "
                              f"{api.run_url(dag_id, run_id)}", EXIT_FAILED)
        again = api.approval(dag_id, run_id) or {}
        if state == "awaiting_input" and not again.get("response_received"):
            # approve_release refused the answer and asked again: the person who triggered the release, or someone
            # not among its approvers, answered (an auth manager that does not assign requests let them through).
            raise ClientError(f"approve_release refused your answer and waits for an approver again: only the "
                              f"service's approvers, never the person who triggered the release, may answer; see "
                              f"the task's log: {api.approval_url(dag_id, run_id)}", EXIT_BAD_INPUT)
        time.sleep(2)
    print(f"The answer is recorded; approve_release has not taken it yet: {api.run_url(dag_id, run_id)}", file=out)
    return EXIT_OK


def print_outcome(api: AirflowApi, dag_id: str, run_id: str, out: Any) -> None:
    report = api.report(dag_id, run_id)
    print("", file=out)
    print(render_markdown(report) if report else "(no release report: the report task did not run)", file=out)
    for ti in api.task_instances(dag_id, run_id):
        if ti.get("state") == "failed" and ti["task_id"] != "release_failed":
            print(f"---- log of failed task {ti['task_id']} (try {ti.get('try_number', 1)}) ----", file=out)
            print(api.log(dag_id, run_id, ti["task_id"], max(1, ti.get("try_number") or 1)), file=out)


def print_calendar(api: AirflowApi, weeks: float, tz_name: str | None, as_json: bool, out: Any) -> int:
    try:
        tz = ZoneInfo(tz_name) if tz_name else None
    except (ZoneInfoNotFoundError, ValueError):
        raise ClientError(f"--tz {tz_name!r} is not an IANA time zone (e.g. Europe/Paris or UTC)",
                          EXIT_BAD_INPUT) from None
    calendar = api.calendar(weeks)
    print(json.dumps(calendar, indent=2) if as_json else render_text(calendar, tz), file=out)
    return EXIT_OK


def parse_run(value: str) -> tuple[str, str]:
    if "/" not in value:
        raise ClientError(f"{value!r}: give the run as <dag_id>/<run_id>, as `trigger` prints it", EXIT_BAD_INPUT)
    dag_id, run_id = value.split("/", 1)
    return dag_id, run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    trigger = commands.add_parser("trigger", help="start release_<service>")
    trigger.add_argument("service")
    trigger.add_argument("--image-tag", required=True)
    trigger.add_argument("--environment", default=None,
                         help="where to release: staging (the default) or production (needs evidence from staging and "
                              "an approver); the catalog names the environments")
    trigger.add_argument("--strategy", choices=["rolling", "blue_green", "canary", "linear"])
    trigger.add_argument("--window", default=None, help="next (default), now, or an ISO 8601 start time")
    trigger.add_argument("--force-reason", default=None,
                         help="required with --window now or a time outside the service's maintenance windows")
    trigger.add_argument("--bake-minutes", type=float)
    trigger.add_argument("--reason", default=None)
    trigger.add_argument("--evidence-override", metavar="REASON", default=None,
                         help="release without the promotion evidence the environment requires, for this reason "
                              "(on record; an approver must accept it where the environment requires one)")
    trigger.add_argument("--dry-run", action="store_true")
    trigger.add_argument("--wait", action="store_true", help="follow the run and print its report")
    trigger.add_argument("--timeout", type=float, default=3600)
    trigger.add_argument("--poll", type=float, default=5)
    for name in ("status", "logs", "report"):
        sub = commands.add_parser(name)
        sub.add_argument("run", help="<dag_id>/<run_id>")
    for name, verb in (("approve", "approve"), ("reject", "reject")):
        sub = commands.add_parser(name, help=f"{verb} a release waiting at approve_release, as the credentials' user")
        sub.add_argument("run", help="<dag_id>/<run_id>")
        sub.add_argument("--comment", default="", help="why; kept in the report")
        sub.add_argument("--timeout", type=float, default=120,
                         help="how long to wait for approve_release to take the answer (seconds)")
    calendar = commands.add_parser("calendar", help="the next maintenance windows and what will run in them")
    calendar.add_argument("--weeks", type=float, default=2)
    calendar.add_argument("--tz", default=None, help="an IANA time zone (default: this machine's)")
    calendar.add_argument("--json", action="store_true", help="print the API's JSON")
    return parser


def main(argv: list[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_BAD_INPUT if exc.code else EXIT_OK
    try:
        url = os.environ.get("OMNI_AIRFLOW_URL")
        if not url:
            raise ClientError("set OMNI_AIRFLOW_URL to the Airflow base URL", EXIT_UNREACHABLE)
        api = AirflowApi(url, os.environ.get("OMNI_AIRFLOW_TOKEN"), os.environ.get("OMNI_AIRFLOW_USERNAME"),
                         os.environ.get("OMNI_AIRFLOW_PASSWORD"))
        if args.command == "calendar":
            return print_calendar(api, args.weeks, args.tz, args.json, out)
        if args.command == "trigger":
            dag_id = f"release_{args.service}"
            conf: dict[str, Any] = {"image_tag": args.image_tag}
            for key, value in (("environment", args.environment), ("strategy", args.strategy), ("window", args.window),
                               ("force_reason", args.force_reason), ("bake_minutes", args.bake_minutes),
                               ("reason", args.reason)):
                if value is not None:
                    conf[key] = value
            if args.evidence_override:
                conf["evidence_override"] = args.evidence_override
            if args.dry_run:
                conf["dry_run"] = True
            run = api.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
            run_id = run["dag_run_id"]
            print(f"Triggered {dag_id}/{run_id}", file=out)
            print(f"  {api.run_url(dag_id, run_id)}", file=out, flush=True)
            if not args.wait:
                return EXIT_OK
            state = follow(api, dag_id, run_id, args.timeout, args.poll, out)
        else:
            dag_id, run_id = parse_run(args.run)
            if args.command in ("approve", "reject"):
                return answer_approval(api, dag_id, run_id, "Approve" if args.command == "approve" else "Reject",
                                       args.comment, args.timeout, out)
            state = api.run(dag_id, run_id)["state"]
            if args.command == "status":
                print(f"{dag_id}/{run_id}: {state}", file=out)
                waiting = False
                for ti in api.task_instances(dag_id, run_id):
                    print(f"  {ti['task_id']}: {ti.get('state')}", file=out)
                    waiting = waiting or (ti["task_id"] == APPROVAL_TASK and ti.get("state") == "awaiting_input")
                if waiting:
                    print_awaiting_approval(api, dag_id, run_id, out)
                return final_exit_code(api, dag_id, run_id, state) if state in FINAL else EXIT_OK
            if args.command == "logs":
                for ti in api.task_instances(dag_id, run_id):
                    if ti.get("state") in ("success", "failed"):
                        print(f"---- {ti['task_id']} ({ti['state']}) ----", file=out)
                        print(api.log(dag_id, run_id, ti["task_id"], max(1, ti.get("try_number") or 1)), file=out)
                return EXIT_OK
        print(f"\n{dag_id}/{run_id}: {state.upper()}", file=out)
        print_outcome(api, dag_id, run_id, out)
        return final_exit_code(api, dag_id, run_id, state)
    except ClientError as exc:
        print(f"omni-release: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
