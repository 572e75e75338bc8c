"""AWS clients that retry what is transient: the one place where every boto client of the release is configured.

botocore's ``standard`` retry mode retries throttling (Throttling*, TooManyRequests, RequestLimitExceeded...), 5xx
answers (500, 502, 503, 504), RequestTimeout, and the errors of a request that never got an answer (connection
refused, reset or closed, connect and read timeouts, EndpointConnectionError), with exponential backoff and jitter,
capped at 20 s between attempts. ``max_attempts`` (retries after the first request) bounds it: 5 retries wait at
most 1 + 2 + 4 + 8 + 16 = 31 s in all, about half that on average.
Anything that outlasts that budget surfaces to the caller: a trigger tries again at its next poll, an operator lets
Airflow retry it.

The AWS connection decides when it says otherwise: ``config_kwargs`` in its extra (``{"retries": {"mode":
"adaptive", "max_attempts": 10}}``, ``connect_timeout``...) win over these defaults, option by option.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.config import Config

RETRIES = {"mode": "standard", "max_attempts": 5}
# A refused or unreachable endpoint should fail fast enough to be retried (botocore's default waits 60 s).
CONNECT_TIMEOUT_SECONDS = 10


def retrying_config(connection_config: Config | None = None) -> Config:
    """Return the release's botocore defaults, with every option the AWS connection sets taking precedence."""
    defaults = Config(retries=dict(RETRIES), connect_timeout=CONNECT_TIMEOUT_SECONDS)
    return defaults.merge(connection_config) if connection_config else defaults


class _RetryingConfig:
    """The botocore config of a hook whose clients retry transient errors (see the module's docstring)."""

    conn_config: Any

    @property
    def config(self) -> Config:
        return retrying_config(self.conn_config.botocore_config)


class RetryingAwsHook(_RetryingConfig, AwsBaseHook):
    """AwsBaseHook whose clients retry transient errors."""


class RetryingS3Hook(_RetryingConfig, S3Hook):
    """S3Hook whose client retries transient errors."""


def aws_client(client_type: str, aws_conn_id: str | None, region_name: str | None = None) -> Any:
    """Return a boto3 client of ``client_type`` for the Airflow AWS connection, retrying transient errors."""
    return RetryingAwsHook(aws_conn_id=aws_conn_id, client_type=client_type, region_name=region_name).conn
