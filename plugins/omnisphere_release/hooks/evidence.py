"""The evidence store: every release's report kept in S3, keyed by service, environment and image digest.

``s3://<bucket>/<service>/<environment>/<sha256 digest>/<run id, URL-quoted>.json`` holds one release (whatever its
outcome): what it released (the image digest and the sha256 of each migration file and data migration spec, as preflight
fingerprinted them), how it ended, when, and its whole report. The bucket is the Airflow Variable the catalog names
(``evidence_bucket_variable``, ``omni_evidence_bucket``). A release into an environment with ``promote_from`` looks
here for a successful release of the same digest in that environment (checks.promotion_verdict).

Keep the bucket versioned and write-once for the release role (S3 Object Lock, or a bucket policy without
DeleteObject), so that evidence cannot be rewritten after the fact.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from airflow.sdk import Variable

from omnisphere_release.catalog import Catalog
from omnisphere_release.hooks.aws import RetryingS3Hook
from omnisphere_release.logs import Log

# The outcomes of a release that changed something (a refused or dry run proves nothing and is not kept).
KEPT_OUTCOMES = ("released", "rolled_back", "rollback_incomplete", "failed")


def evidence_prefix(service: str, environment: str, image_digest: str) -> str:
    return f"{service}/{environment}/{image_digest}/"


def evidence_bucket(catalog: Catalog) -> str:
    """Return the evidence bucket: the Airflow Variable the catalog names ("" when unset)."""
    return str(Variable.get(catalog.evidence_bucket_variable, default="") or "")


class EvidenceStoreHook(RetryingS3Hook):
    """Write a release's evidence record; read the records of one service, environment and image digest."""

    def store(self, bucket: str, record: dict[str, Any]) -> str:
        """Write ``record`` under its service, environment, digest and run; return its s3:// address. A retry of
        the same run's report overwrites its own record, nothing else."""
        e = record["evidence"]
        key = evidence_prefix(e["service"], e["environment"], e["image_digest"]) + f"{quote(e['run_id'], safe='')}.json"
        self.load_string(json.dumps(record, indent=2, default=str), key, bucket, replace=True, encrypt=True)
        return f"s3://{bucket}/{key}"

    def releases(self, bucket: str, service: str, environment: str, image_digest: str) -> list[dict[str, Any]]:
        """Return the evidence (the ``evidence`` part of each record, with ``stored_at``) of every release of
        ``image_digest`` of ``service`` in ``environment``; empty when there is none."""
        found = []
        for item in self.iter_file_metadata(prefix=evidence_prefix(service, environment, image_digest),
                                            bucket_name=bucket):
            if item["Key"].endswith(".json"):
                record = json.loads(self.read_key(item["Key"], bucket))
                found.append({**record["evidence"], "stored_at": f"s3://{bucket}/{item['Key']}"})
        return found

    def rehearsals(self, bucket: str, service: str, environment: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest rehearsal reports of ``service`` on a copy of ``environment`` (rehearse_<service> keeps
        them under rehearsals/<service>/<environment>/), newest first."""
        items = [item for item in self.iter_file_metadata(prefix=f"rehearsals/{service}/{environment}/",
                                                          bucket_name=bucket) if item["Key"].endswith(".json")]
        items.sort(key=lambda item: item["LastModified"], reverse=True)
        return [json.loads(self.read_key(item["Key"], bucket)) for item in items[:limit]]


def evidence_record(report: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Return the evidence record of a release: its fingerprint (from preflight's plan), outcome and report."""
    fingerprint = plan["fingerprint"]
    return {"evidence": {
        "service": plan["service"],
        "environment": plan["environment"],
        "image_digest": fingerprint["image_digest"],
        "image": plan.get("target_image"),
        "image_tag": plan.get("image_tag"),
        "dag_id": report.get("dag_id"),
        "run_id": report["run_id"],
        "outcome": report["outcome"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "triggered_by": report.get("triggered_by"),
        "schema_version": fingerprint["schema_version"],
        "migrations": fingerprint["migrations"],
        "data_migrations": fingerprint["data_migrations"],
        # A release without evidence of its own, let through by a force_reason (and an approver, where required).
        "promotion": plan.get("promotion"),
    }, "report": report}


def record_evidence(report: dict[str, Any], plan: dict[str, Any] | None, catalog: Catalog, aws_conn_id: str | None,
                    log: Log) -> str | None:
    """Keep ``report`` as evidence of its release (preflight's ``plan``); return where, or None when there is
    nothing to keep (refused in preflight, a dry run) or no evidence bucket. Never raises: the report is written
    whatever happens, and a missing record only means that this release cannot be promoted."""
    if not plan or plan.get("dry_run") or report.get("outcome") not in KEPT_OUTCOMES:
        return None
    if not (plan.get("fingerprint") or {}).get("image_digest"):
        log.warning("No evidence kept for run %s: the image's digest is unknown (its registry was not checked), and "
                    "evidence is matched by digest.", report.get("run_id"))
        return None
    bucket = evidence_bucket(catalog)
    if not bucket:
        log.warning("No evidence kept for run %s: the Airflow Variable %s (the evidence bucket) is not set; this "
                    "release cannot be promoted to an environment that requires evidence.", report.get("run_id"),
                    catalog.evidence_bucket_variable)
        return None
    record = evidence_record(report, plan)
    try:
        location = EvidenceStoreHook(aws_conn_id=aws_conn_id).store(bucket, record)
    except Exception as exc:  # noqa: BLE001 - the report itself is still stored and printed
        log.warning("Could not keep the evidence of run %s in s3://%s: %s. This release cannot be promoted until it "
                    "is released again.", report.get("run_id"), bucket, exc)
        return None
    e = record["evidence"]
    log.info("Kept the evidence of this release (%s of %s in %s, image %s) at %s.", e["outcome"], e["service"],
             e["environment"], e["image_digest"], location)
    return location
