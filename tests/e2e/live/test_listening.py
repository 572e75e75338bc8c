"""Every port the live Airflow opens listens on 127.0.0.1 only: the API server and the log servers of the scheduler's
executor and the triggerer, which Airflow itself binds to every interface (devstack/airflow_server.loopback_shim)."""

from __future__ import annotations

import json

import psutil


def test_the_live_airflow_listens_on_loopback_only(live_airflow):
    ports = json.loads((live_airflow.home / "standalone.json").read_text())["ports"]
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    for part, port in ports.items():
        addresses = sorted(ip for ip, p in listening if p == port)
        assert addresses == ["127.0.0.1"], f"{part} on port {port} listens on {addresses}"
