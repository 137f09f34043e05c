"""`extproc fake-llm`: its options, and a process that serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Callable

from .app import log, serve
from .faults import FAULT_HELP, parse_fault
from .settings import DEFAULT_LISTEN, INSTANCE_HEADER, FakeLLMSettings, validate_settings


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), port


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _non_negative_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def _rate(value: str) -> float:
    number = _non_negative_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value!r}")
    return number


def _fault_spec(value: str) -> str | None:
    try:
        fault = parse_fault(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if fault is None else value.strip().lower()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``extproc fake-llm`` options to ``parser``."""
    d = FakeLLMSettings()
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on; port 0 picks a free port (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--ttft-ms",
        type=_non_negative_float,
        default=d.ttft_ms,
        help="delay before the first byte/chunk in milliseconds (default %(default)s)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative_float,
        default=d.tokens_per_second,
        help="pace streamed tokens at this rate; 0 = no pacing (default %(default)s)",
    )
    parser.add_argument(
        "--response-tokens",
        type=_non_negative_int,
        default=d.response_tokens,
        help="completion length in tokens (default %(default)s)",
    )
    parser.add_argument(
        "--embedding-dimensions",
        type=_positive_int,
        default=d.embedding_dimensions,
        help="embedding size when the request has no 'dimensions' (default %(default)s)",
    )
    parser.add_argument(
        "--fault",
        type=_fault_spec,
        default=d.fault,
        help=f"fault injected into /v1 requests: {FAULT_HELP} (default none)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_rate,
        default=d.fault_rate,
        help="probability that --fault applies to a request (default %(default)s)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=_non_negative_float,
        default=d.stall_seconds,
        help="how long the stall faults hold a request (default %(default)s)",
    )
    parser.add_argument(
        "--name",
        default=d.name,
        help=f"instance name, returned in the {INSTANCE_HEADER} header (default %(default)s)",
    )
    parser.add_argument(
        "--record-limit",
        type=_non_negative_int,
        default=d.record_limit,
        help="recorded requests kept for /_fake/requests (default %(default)s)",
    )


def _settings_from_args(args: argparse.Namespace) -> FakeLLMSettings:
    d = FakeLLMSettings()
    return FakeLLMSettings(
        ttft_ms=getattr(args, "ttft_ms", d.ttft_ms),
        tokens_per_second=getattr(args, "tokens_per_second", d.tokens_per_second),
        response_tokens=getattr(args, "response_tokens", d.response_tokens),
        embedding_dimensions=getattr(args, "embedding_dimensions", d.embedding_dimensions),
        fault=getattr(args, "fault", d.fault),
        fault_rate=getattr(args, "fault_rate", d.fault_rate),
        stall_seconds=getattr(args, "stall_seconds", d.stall_seconds),
        name=getattr(args, "name", d.name),
        record_limit=getattr(args, "record_limit", d.record_limit),
    )


async def _serve_until_terminated(host: str, port: int, settings: FakeLLMSettings) -> None:
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGTERM, terminated.set)
        handles_sigterm = True
    except (NotImplementedError, RuntimeError):  # Windows / not the main thread
        handles_sigterm = False
    server = asyncio.create_task(serve(host, port, settings))
    waiter = asyncio.create_task(terminated.wait())
    try:
        done, _ = await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # surfaces bind errors
        else:
            log.info("fake-llm %r: SIGTERM received, shutting down", settings.name)
    finally:
        waiter.cancel()
        server.cancel()
        await asyncio.gather(server, waiter, return_exceptions=True)
        if handles_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``extproc fake-llm``; returns the process exit code."""
    host, port = args.listen if isinstance(args.listen, tuple) else _listen_address(args.listen)
    settings = _settings_from_args(args)
    try:
        validate_settings(settings)
    except ValueError as exc:
        print(f"extproc fake-llm: {exc}", file=sys.stderr)
        return 2
    # No-op when the CLI already configured logging; otherwise the bound address would be lost.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_terminated(host, port, settings))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        log.error("fake-llm could not listen on %s:%d: %s", host, port, exc)
        return 1
    return 0
