"""Release reports in S3, beside the backups: ``<service>/<run>/release-report.json`` and ``.md``."""

from __future__ import annotations

import json
from typing import Any

from omnisphere_release.hooks.aws import RetryingS3Hook

REPORT_NAME = "release-report"


class ReleaseReportStoreHook(RetryingS3Hook):
    """Store a release's report and read earlier ones back (the window estimate learns from them)."""

    def store(self, bucket: str, prefix: str, report: dict[str, Any], markdown: str) -> str:
        """Write ``<prefix>/release-report.json`` and ``.md`` (encrypted at rest; a retry overwrites its own)."""
        key = f"{prefix}/{REPORT_NAME}"
        self.load_string(json.dumps(report, indent=2, default=str), f"{key}.json", bucket, replace=True, encrypt=True)
        self.load_string(markdown, f"{key}.md", bucket, replace=True, encrypt=True)
        return f"s3://{bucket}/{key}.json"

    def recent_reports(self, bucket: str, service: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest ``limit`` reports of ``service``, newest first."""
        found = [item for item in self.iter_file_metadata(prefix=f"{service}/", bucket_name=bucket)
                 if item["Key"].endswith(f"{REPORT_NAME}.json")]
        found.sort(key=lambda item: item["LastModified"], reverse=True)
        return [json.loads(self.read_key(item["Key"], bucket)) for item in found[:limit]]
