"""`extproc keys create|list|show|rotate|revoke`: run-time API keys from a terminal, through the
sidecar's admin API (KeyAdmin), like `extproc quota`.

A secret is printed by create and rotate only, once: the gateway keeps its sha256, nothing else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..config import METRICS, Limit

if TYPE_CHECKING:
    from ..admin.v1 import keys_pb2

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_COMPACT_LIMIT = re.compile(
    r"(?P<window>[a-z]+):(?P<metric>[a-z_]+)=(?P<amount>\d+(?:\.\d+)?)(?::(?P<models>.+))?"
)

LIMIT_HELP = (
    "a budget of the key, repeatable: WINDOW:METRIC=AMOUNT[:MODEL,...], e.g. day:tokens=200000, "
    "month:usd=50 (dollars), minute:requests=60:gpt-4o,gpt-4o-mini; or the config file's form "
    'as JSON, e.g. \'{"name": "daily", "window": "day", "tokens": 200000}\'. WINDOW: '
    f"minute, hour, day, month; METRIC: {', '.join(METRICS)}"
)
EXPIRES_HELP = (
    "when the key stops working: a duration from now (90m, 12h, 30d, 2w) or a UTC date or "
    "time (2027-01-01, 2027-01-01T12:00:00Z); default: never"
)


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 90m, 12h, 30d): {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_expires(text: str, now: float | None = None) -> float:
    """A duration from `now`, or an ISO date/time (UTC unless it says otherwise), in unix time."""
    now = time.time() if now is None else now
    if _DURATION.fullmatch(text.strip()):
        return now + parse_duration(text)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"neither a duration (30d) nor a date (2027-01-01): {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def parse_limit(text: str) -> Limit:
    """WINDOW:METRIC=AMOUNT[:MODEL,...], or a JSON object as in the config file."""
    data: Any
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    else:
        match = _COMPACT_LIMIT.fullmatch(text.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"not WINDOW:METRIC=AMOUNT[:MODEL,...] (e.g. day:tokens=200000): {text!r}"
            )
        amount = float(match["amount"])
        data = {"window": match["window"], match["metric"]: amount}
        if match["metric"] != "usd" and amount.is_integer():
            data[match["metric"]] = int(amount)
        if match["models"]:
            data["models"] = [m for m in match["models"].split(",") if m]
    try:
        return Limit.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
        raise argparse.ArgumentTypeError(f"{text!r}: {'; '.join(problems)}") from None


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def add_arguments(
    parser: argparse.ArgumentParser, admin_arguments: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The `keys` command's actions; `admin_arguments` adds --config/--address/--token-env."""
    actions = parser.add_subparsers(dest="keys_action", required=True, metavar="ACTION")

    p = actions.add_parser("create", help="a new key; prints its secret, once")
    p.add_argument("--team", required=True, help="a team of the sidecar's config")
    p.add_argument("--user", help="whose key it is within the team (e.g. an e-mail address)")
    p.add_argument("--expires", type=parse_expires, help=EXPIRES_HELP)
    p.add_argument(
        "--models",
        type=_models,
        help="comma-separated models or model groups it may use (default: the team's)",
    )
    p.add_argument("--limit", type=parse_limit, action="append", default=[], help=LIMIT_HELP)
    p.add_argument("--description", default="", help="a note for whoever reads the list")
    admin_arguments(p)

    p = actions.add_parser("list", help="the keys (of a team)")
    p.add_argument("--team", help="only this team's")
    p.add_argument("--all", action="store_true", help="revoked keys too")
    admin_arguments(p)

    p = actions.add_parser("show", help="one key")
    p.add_argument("id", help="its id, key_...")
    admin_arguments(p)

    p = actions.add_parser("rotate", help="a new secret for a key; prints it, once")
    p.add_argument("id", help="its id, key_...")
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=0.0,
        help="how long the old secret keeps working (e.g. 1h; default: it stops at once)",
    )
    admin_arguments(p)

    p = actions.add_parser("revoke", help="the key stops working, everywhere within a second")
    p.add_argument("id", help="its id, key_...")
    admin_arguments(p)


def run_keys_command(args: argparse.Namespace, address: str, token: str | None) -> int:
    import grpc

    from ..admin.client import admin_metadata
    from ..admin.v1 import keys_pb2_grpc

    metadata = admin_metadata(token)
    # grpc understands HOST:PORT and unix:/path alike.
    with grpc.insecure_channel(address) as channel:
        stub = keys_pb2_grpc.KeyAdminStub(channel)
        try:
            _ACTIONS[args.keys_action](stub, args, metadata)
        except grpc.RpcError as err:
            action = args.keys_action
            print(f"extproc keys {action}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


_Metadata = tuple[tuple[str, str], ...]


def _create(stub: Any, args: argparse.Namespace, metadata: _Metadata) -> None:
    from ..admin.keys_service import limit_message
    from ..admin.v1 import keys_pb2

    request = keys_pb2.CreateKeyRequest(
        team=args.team,
        user=args.user or "",
        expires_at=args.expires or 0.0,
        models=args.models or [],
        limits=[limit_message(lim) for lim in args.limit],
        description=args.description,
    )
    reply = stub.CreateKey(request, metadata=metadata, timeout=10)
    _print_secret(reply.key, reply.secret, "created")


def _rotate(stub: Any, args: argparse.Namespace, metadata: _Metadata) -> None:
    from ..admin.v1 import keys_pb2

    request = keys_pb2.RotateKeyRequest(id=args.id, grace_seconds=args.grace)
    reply = stub.RotateKey(request, metadata=metadata, timeout=10)
    _print_secret(reply.key, reply.secret, "rotated")
    if reply.key.previous_valid_until:
        print(f"the old secret works until {_time(reply.key.previous_valid_until)}")


def _revoke(stub: Any, args: argparse.Namespace, metadata: _Metadata) -> None:
    from ..admin.v1 import keys_pb2

    key = stub.RevokeKey(keys_pb2.RevokeKeyRequest(id=args.id), metadata=metadata, timeout=10).key
    print(f"{key.id} (team {key.team}) revoked at {_time(key.revoked_at)}")


def _show(stub: Any, args: argparse.Namespace, metadata: _Metadata) -> None:
    from ..admin.v1 import keys_pb2

    reply = stub.GetKey(keys_pb2.GetKeyRequest(id=args.id), metadata=metadata, timeout=10)
    print(format_key(reply.key))


def _list(stub: Any, args: argparse.Namespace, metadata: _Metadata) -> None:
    from ..admin.v1 import keys_pb2

    request = keys_pb2.ListKeysRequest(team=args.team or "", include_revoked=args.all)
    print(format_list(stub.ListKeys(request, metadata=metadata, timeout=10).keys))


_ACTIONS: dict[str, Callable[[Any, argparse.Namespace, _Metadata], None]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "rotate": _rotate,
    "revoke": _revoke,
}


def _print_secret(key: keys_pb2.Key, secret: str, done: str) -> None:
    owner = f"team {key.team}" + (f", user {key.user}" if key.user else "")
    print(f"{key.id} ({owner}) {done}")
    print(f"secret: {secret}")
    # On stderr: `... | tail -1` or a capture of stdout still gets the secret alone last.
    print("Store the secret now: it will not be shown again.", file=sys.stderr)


def _time(when: float) -> str:
    if not when:
        return "-"
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def _limit_text(limit: keys_pb2.Limit) -> str:
    amount = f"{limit.amount:g}" if limit.metric == "usd" else str(int(limit.amount))
    text = f"{limit.window}:{limit.metric}={amount}"
    if limit.models:
        text += ":" + ",".join(limit.models)
    return f"{limit.name}={text}" if limit.name else text


def format_key(key: keys_pb2.Key) -> str:
    rows = [
        ("id", key.id),
        ("team", key.team),
        ("user", key.user or "-"),
        ("secret", f"sk-aigw-...{key.hint} (only these last characters are kept)"),
        ("status", key.status),
        ("models", ", ".join(key.models) or "the team's"),
        ("limits", "; ".join(_limit_text(lim) for lim in key.limits) or "-"),
        ("created", _time(key.created_at)),
        ("expires", _time(key.expires_at) if key.expires_at else "never"),
        ("last used", _time(key.last_used_at) if key.last_used_at else "not yet"),
    ]
    if key.rotated_at:
        rows.append(("rotated", _time(key.rotated_at)))
    if key.previous_valid_until:
        rows.append(("old secret until", _time(key.previous_valid_until)))
    if key.revoked_at:
        rows.append(("revoked", _time(key.revoked_at)))
    rows.append(("description", key.description or "-"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def format_list(keys: Any) -> str:
    if not keys:
        return "no keys"
    rows = [("id", "team", "user", "secret", "status", "expires", "last used", "description")]
    for key in keys:
        rows.append(
            (
                key.id,
                key.team,
                key.user or "-",
                f"...{key.hint}",
                key.status,
                _time(key.expires_at) if key.expires_at else "never",
                _time(key.last_used_at),
                key.description,
            )
        )
    from ..admin.client import table_lines

    return "\n".join(line.rstrip() for line in table_lines(rows))
