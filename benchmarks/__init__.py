"""Benchmarks for the gateway, measured against an Envoy-only baseline (see README.md)."""
