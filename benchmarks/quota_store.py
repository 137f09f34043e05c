"""Quota check-and-reserve cost per request: the embedded store against Redis on loopback.

    python -m benchmarks.quota_store [--requests 5000] [--runs 3] [--concurrency 1,16]

One "request" is what the sidecar does per LLM call: reserve against the team's limits
(three limits here: tokens/minute, requests/minute, tokens/day), then settle. It starts its own
redis-server on a free loopback port and stops it at the end. Reported: microseconds per
request (reserve + settle, as the event loop sees them), median over runs. The measurement is
`benchmarks.lib.quota_store`.
"""

from __future__ import annotations

import argparse

from benchmarks.lib.quota_store import collect, markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 16]
    )
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    print(markdown(args, collect(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
