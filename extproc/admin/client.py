"""`extproc quota usage|reset|stats` and `extproc reload`: the admin API from a terminal."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc

from .v1 import config_pb2, config_pb2_grpc, quota_pb2, quota_pb2_grpc


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata of a call to the admin API: its token, when there is one (the
    services' `authorized` checks it)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def run_reload_command(address: str, token: str | None) -> int:
    metadata = admin_metadata(token)
    with grpc.insecure_channel(address) as channel:
        stub = config_pb2_grpc.ConfigAdminStub(channel)
        try:
            reply = stub.Reload(config_pb2.ReloadRequest(), metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            print(f"extproc reload: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if not reply.applied:
        print(f"{reply.config_path}: rejected; the previous config keeps serving", file=sys.stderr)
        for problem in reply.errors:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{reply.config_path}: applied (sha256 {reply.config_sha256[:12]})")
    return 0


def run_quota_command(
    action: str,
    team: str,
    address: str,
    token: str | None,
    user: str = "",
    organization: str = "",
) -> int:
    metadata = admin_metadata(token)
    # grpc understands HOST:PORT and unix:/path alike.
    with grpc.insecure_channel(address) as channel:
        stub = quota_pb2_grpc.QuotaAdminStub(channel)
        try:
            if action == "stats":
                stats = stub.GetStats(quota_pb2.GetStatsRequest(), metadata=metadata, timeout=10)
                print(
                    f"pid {stats.pid}: {stats.active_ext_proc_streams} ext_proc streams, "
                    f"{stats.active_sse_streams} SSE streams active "
                    f"({stats.sse_streams_total} since start)"
                )
                for key, count in sorted(stats.guard_verdicts.items()):
                    print(f"  guard verdicts {key}: {count}")
                return 0
            if action == "reset":
                reply = stub.ResetUsage(
                    quota_pb2.ResetUsageRequest(team=team), metadata=metadata, timeout=10
                )
                print(f"team {team}: usage reset ({reply.keys_removed} counters or reservations)")
                return 0
            request = quota_pb2.GetUsageRequest(team=team, user=user, organization=organization)
            usage = stub.GetUsage(request, metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            print(f"extproc quota {action}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(format_usage(usage))
    return 0


def format_usage(usage: quota_pb2.GetUsageResponse) -> str:
    whose = f"organization {usage.organization}" if not usage.team else f"team {usage.team}"
    if usage.user:
        whose += f", user {usage.user}"
    if not usage.limits:
        return f"{whose}: no limits configured"
    rows = [("limit", "metric", "window", "used", "reserved", "remaining", "of", "resets in")]
    for lim in usage.limits:
        rows.append(
            (
                lim.name if lim.level in ("team", "") else f"{lim.level}:{lim.name}",
                lim.metric,
                lim.window,
                str(lim.used),
                str(lim.reserved),
                str(lim.remaining),
                str(lim.limit),
                f"{lim.reset_in_seconds:.0f}s",
            )
        )
    return "\n".join([f"{whose} (usd amounts in micro-USD)", *table_lines(rows)])


def table_lines(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines of aligned columns (a command's table)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
