# The Airflow image of the OmniSphere release orchestrator: the official Airflow image plus the project's pinned
# dependencies (the same versions as constraints.txt, so the containers run what the tests ran).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/omnisphere/
RUN pip install --no-cache-dir -r /opt/omnisphere/requirements.txt -c /opt/omnisphere/constraints.txt
