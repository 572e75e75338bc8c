"""Hooks: I/O only (service databases, ECS deployments, CloudWatch metrics, HTTP probes)."""
