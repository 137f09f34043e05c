"""Fault injection: the faults a request can be given, and how each one hits it.

A fault is ``429``, ``500``, ``503``, ``reset``, ``stall``, ``reset-after:N`` or
``stall-after:N`` (``none`` suppresses a fault configured on the instance). ``reset-after:N``
and ``stall-after:N`` count SSE events (the role chunk and ``[DONE]`` included); on
non-streaming requests they behave like ``reset``/``stall`` so the fault is never silently
dropped. ``stall`` delays the response by ``stall_seconds`` and then answers normally, like a
very slow upstream would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import NoReturn

from aiohttp import web

from .wire import SSE_HEADERS, error_response

FAULT_HELP = "429, 500, 503, reset, stall, reset-after:N, stall-after:N or none"
_SIMPLE_FAULTS = frozenset({"429", "500", "503", "reset", "stall"})
# How often a long wait (ttft, pacing, stall) checks whether the client went away; keeps
# handlers from outliving their connection (and delaying shutdown) even when the runner was
# not created with handler_cancellation.
_DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str  # one of _SIMPLE_FAULTS
    after: int | None = None  # SSE events to send before the fault; None = before responding


@lru_cache(maxsize=256)
def parse_fault(spec: str) -> Fault | None:
    text = spec.strip().lower()
    if text in ("", "none"):
        return None
    if text in _SIMPLE_FAULTS:
        return Fault(text)
    kind, sep, count = text.partition(":")
    if sep and kind in ("reset-after", "stall-after"):
        try:
            after = int(count)
        except ValueError:
            after = -1
        if after >= 0:
            return Fault(kind.removesuffix("-after"), after)
    raise ValueError(f"unknown fault {spec!r}: expected {FAULT_HELP}")


class Aborted(Exception):
    """The connection was deliberately reset (or vanished); there is no response to send."""


def reset_connection(request: web.BaseRequest) -> NoReturn:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST instead of FIN, i.e. a real "connection reset".
            with contextlib.suppress(OSError, AttributeError, NotImplementedError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise Aborted


async def sleep_until(request: web.BaseRequest, deadline: float) -> None:
    """Sleep until the loop-time deadline; raises Aborted once the client has gone away."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(remaining, _DISCONNECT_POLL_SECONDS))
        transport = request.transport
        if transport is None or transport.is_closing():
            raise Aborted


async def pause(request: web.BaseRequest, seconds: float) -> None:
    if seconds > 0:
        await sleep_until(request, asyncio.get_running_loop().time() + seconds)


async def pre_response_fault(
    request: web.Request, fault: Fault, stall_seconds: float
) -> web.Response | None:
    """The injected error response, or None once a stall has passed (then answer normally)."""
    kind = fault.kind
    if kind == "429":
        return error_response(
            429,
            "Rate limit reached for requests (injected by fake-llm).",
            type_="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )
    if kind == "500":
        return error_response(
            500,
            "The server had an error while processing your request (injected by fake-llm).",
            type_="server_error",
        )
    if kind == "503":
        return error_response(
            503,
            "The server is overloaded or not ready yet (injected by fake-llm).",
            type_="server_error",
        )
    if kind == "reset":
        reset_connection(request)
    await pause(request, stall_seconds)
    return None


async def non_stream_fault(request: web.Request, fault: Fault | None, stall_seconds: float) -> None:
    # A mid-stream fault on a non-streaming request degrades to its plain form.
    if fault is not None and fault.after is not None:
        await pre_response_fault(request, fault, stall_seconds)


class EventWriter:
    """Writes SSE events, injecting a mid-stream fault after the configured event count."""

    __slots__ = ("_fault", "_request", "_response", "_sent", "_stall_seconds", "stalled")

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        fault: Fault | None,
        stall_seconds: float,
    ) -> None:
        self._request = request
        self._response = response
        self._fault = fault if fault is not None and fault.after is not None else None
        self._stall_seconds = stall_seconds
        self._sent = 0
        self.stalled = 0.0  # seconds spent stalling, so token pacing resumes instead of bursting

    async def send(self, data: bytes, *, last: bool = False) -> None:
        # A fault placed past the end fires before the final event, so "-after:N" is never
        # silently skipped (SDKs stop reading at [DONE] and would not notice a later reset).
        if self._fault is not None and (last or self._sent >= (self._fault.after or 0)):
            await self._trigger()
        await self._response.write(data)
        self._sent += 1

    async def _trigger(self) -> None:
        fault, self._fault = self._fault, None
        assert fault is not None
        if fault.kind == "reset":
            reset_connection(self._request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pause(self._request, self._stall_seconds)
        self.stalled += loop.time() - started


async def open_event_stream(
    request: web.Request, ttft: float, fault: Fault | None, stall_seconds: float
) -> tuple[web.StreamResponse, EventWriter, float]:
    """Wait for the first token, then start an SSE answer: (response, its event writer, the
    loop time of the first token, which pacing counts from)."""
    first_at = asyncio.get_running_loop().time() + ttft
    if ttft > 0:
        await sleep_until(request, first_at)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    return response, EventWriter(request, response, fault, stall_seconds), first_at
