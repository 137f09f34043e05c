"""Metrics, traces and the audit trail."""
