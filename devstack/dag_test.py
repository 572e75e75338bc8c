"""``dag.test()`` with the DAG callbacks run as the DAG processor runs them: for the tests, ``make demo`` and the bench.

Local tooling only (like the rest of devstack/): production's DAG processor runs the callbacks itself.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Generator
from types import SimpleNamespace
from typing import Any
from unittest import mock


@contextlib.contextmanager
def dag_processor(parsed: Any) -> Generator[None, None, None]:
    """Run the DAG callbacks (on_success_callback, on_failure_callback) of ``dag.test()`` as the DAG processor runs
    them in production, with ``parsed``, the DAG as parsed from its file.

    ``dag.test()`` calls them itself, with its serialized copy of the DAG (whose params without a default, such as a
    release's image_tag, fail the callback's context and ``dag.test()`` with it) and without the Task SDK's channel
    (XCom, task states). The DAG processor takes the scheduler's callback request, the DAG as parsed from its file,
    and has that channel: here the request goes to the processor's own function, with the in-process channel
    ``dag.test()`` gives each task.
    """
    import psutil
    import structlog
    from airflow.callbacks.callback_requests import DagCallbackRequest, DagRunContext
    from airflow.dag_processing import processor
    from airflow.models.dagrun import DagRun
    from airflow.sdk.execution_time.supervisor import (
        InProcessSupervisorComms,
        InProcessTestSupervisor,
        set_supervisor_comms,
    )

    def execute_dag_callbacks(run, dag, success=True, relevant_ti=None, reason="success"):  # dag: its serialized copy
        # What the scheduler sends the processor (DagRun.produce_dag_callback, which needs a session here).
        request = DagCallbackRequest(filepath=parsed.fileloc, dag_id=run.dag_id, run_id=run.run_id,
                                     bundle_name="dags-folder", bundle_version=None, is_failure_callback=not success,
                                     context_from_server=DagRunContext(dag_run=run, last_ti=relevant_ti), msg=reason)
        processor._execute_dag_callbacks(SimpleNamespace(dags={parsed.dag_id: parsed}), request,
                                         structlog.get_logger("dag_processor"))

    supervisor = InProcessTestSupervisor(id=uuid.uuid4(), pid=os.getpid(), process=psutil.Process(),
                                         process_log=structlog.get_logger(logger_name="task").bind(),
                                         client=InProcessTestSupervisor._api_client())
    supervisor.comms = InProcessSupervisorComms(supervisor=supervisor)
    with set_supervisor_comms(supervisor.comms), mock.patch.object(DagRun, "execute_dag_callbacks",
                                                                   execute_dag_callbacks):
        yield
