"""Token counting for OpenAI-style requests, used on the request hot path.

Counts use tiktoken when the encoding can be loaded. When it cannot (no network and no
local copy in TIKTOKEN_CACHE_DIR), counts fall back to ceil(utf-8 bytes / 4) and are flagged
``exact=False``; the fallback is announced once per encoding with a logged warning.

Chat counts follow OpenAI's cookbook "How to count tokens with tiktoken": 3 tokens of framing
per message, 1 per ``name``, 3 to prime the reply (4 / -1 for gpt-3.5-turbo-0301).

Counting never fails a request and its time is bounded. Prompts up to
ASYNC_THREAD_THRESHOLD_CHARS are encoded whole, inline (the common, latency-critical case).
Longer texts are split into pieces of at most PIECE_CHARS characters, cut right before a space
that follows a non-space character where the window has one: cl100k and o200k's pre-tokenizers
never put such a space inside a piece (it starts the next word), so the pieces' tokens are
exactly the whole text's. A window without such a space (one huge word, a run of whitespace) is
cut where it ends ("hard_cut": each such cut may shift the count by about a token). Pieces are
far shorter than what tiktoken's regex gives up on (about a million whitespace characters
followed by a non-space), and a piece it fails on all the same is estimated.

Long prompts are counted on COUNT_THREADS threads shared by the process (tiktoken releases the
GIL). Their scheduler serves teams round-robin, piece by piece, and within a team the prompt
with the least text left first: one team's huge prompts never hold up another team's. A
request waits at most its budget (sidecar.count_budget_ms, the wait for a thread included);
what is not counted by then is estimated. A request Envoy abandons (its task is cancelled)
leaves the queue at once. A count that is not exact for one of these reasons says so in
TokenCount.exact and in the metric extproc_token_count_estimates_total{reason}.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson
import tiktoken
import tiktoken.model

from .telemetry.metrics import TOKEN_COUNT_ESTIMATES, TOKEN_COUNT_REASONS, TOKEN_COUNT_SECONDS

__all__ = [
    "ASYNC_THREAD_THRESHOLD_CHARS",
    "COUNT_THREADS",
    "DEFAULT_BUDGET_S",
    "IMAGE_TOKENS_ESTIMATE",
    "PIECE_CHARS",
    "SYNC_BUDGET_S",
    "TokenCount",
    "TokenCounter",
    "estimate_tokens",
]

logger = logging.getLogger("extproc.tokens")

# Up to this many characters (all of a prompt's texts together) a prompt is encoded inline,
# holding the event loop: about a millisecond of prose, ~5 ms of the slowest text (whitespace
# runs, CJK). Longer ones go to the tokenizer threads, in pieces; tiktoken releases the GIL
# while encoding, so the loop keeps going.
ASYNC_THREAD_THRESHOLD_CHARS = 16 * 1024

# Longer texts are encoded in pieces of PIECE_CHARS // 2 to PIECE_CHARS characters: a piece
# takes at most a few milliseconds whatever it holds (whitespace, one random word, CJK), so a
# thread is never held long by one request, and tiktoken's regex never meets a run of
# whitespace long enough to fail on (about a million characters followed by a non-space).
PIECE_CHARS = 16 * 1024
# The threads counting long prompts, shared by every TokenCounter of the process (a reload
# builds a new counter, never new threads).
COUNT_THREADS = 2
# How long a request may wait for its prompt's count (sidecar.count_budget_ms sets it).
DEFAULT_BUDGET_S = 0.5
# The synchronous counts (a completion's text) run on the event loop, where every millisecond
# holds every request: they stop sooner (~1 M characters of prose are counted by then).
SYNC_BUDGET_S = 0.1

# OpenAI documents 85 tokens as the fixed cost of a low-detail image. High-detail images cost
# more, but that depends on the image's size, which is unknown without fetching it.
IMAGE_TOKENS_ESTIMATE = 85

# Model names come from clients, so the resolution cache must not grow without bound.
_MODEL_CACHE_SIZE = 1024

_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# gpt-3.5-turbo-0301 used an older chat format: <|im_start|>{role or name}\n{content}<|im_end|>
_LEGACY_CHAT_MODELS = frozenset({"gpt-3.5-turbo-0301", "gpt-35-turbo-0301"})
_LEGACY_TOKENS_PER_MESSAGE = 4
_LEGACY_TOKENS_PER_NAME = -1


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    # False when any part was estimated: encoding unavailable, images, tool definitions,
    # tool calls (rendered by the server in an undocumented format) or unrecognised shapes;
    # or when a long text was cut hard, tiktoken failed on a piece or the budget ran out.
    exact: bool


def estimate_tokens(text: str) -> int:
    """Fallback estimate: ceil(utf-8 bytes / 4)."""
    if text.isascii():  # known without a scan: one byte per character
        return (len(text) + 3) // 4
    # surrogatepass: clients can send lone surrogates (JSON "\\ud800"); must not raise.
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


def _estimate_span(text: str, start: int, end: int) -> int:
    if text.isascii():
        return (end - start + 3) // 4
    return estimate_tokens(text[start:end])


# Why a count is not exact (bits of a count's flags), and the metric's reason for each.
_HARD_CUT = 1
_TOKENIZER_ERROR = 2
_BUDGET = 4
_FLAG_REASONS = (
    (_HARD_CUT, "hard_cut"),
    (_TOKENIZER_ERROR, "tokenizer_error"),
    (_BUDGET, "budget"),
)
_ESTIMATES = {reason: TOKEN_COUNT_ESTIMATES.labels(reason) for reason in TOKEN_COUNT_REASONS}
_tokenizer_error_logged = False


def _record(flags: int) -> None:
    for flag, reason in _FLAG_REASONS:
        if flags & flag:
            _ESTIMATES[reason].inc()


# A space right after a non-space character: cl100k and o200k's pre-tokenizers always start a
# piece there (the space joins the next word), so a cut there leaves every token as it was.
# (Python's \s also matches \x1c-\x1f, which the tokenizers' \s does not: no cut there, which
# is merely conservative.) Written to start with the space: re then skips to the next space
# at C speed (a window of one random word is searched in ~3 us instead of ~110 us).
_SAFE_CUT = re.compile(r" (?<=\S )")


def _next_cut(text: str, start: int) -> tuple[int, bool]:
    """Where the piece of `text` beginning at `start` ends, and whether the cut is safe."""
    end = start + PIECE_CHARS
    if end >= len(text):
        return len(text), True
    found = _SAFE_CUT.search(text, start + PIECE_CHARS // 2, end + 1)
    if found is None:
        return end, False
    return found.start(), True


def _encode_piece(encode: Callable[..., list[int]], piece: str) -> tuple[int, int]:
    """The piece's token count, and _TOKENIZER_ERROR if tiktoken failed (then an estimate)."""
    try:
        # disallowed_special=(): "<|endoftext|>" typed by a user is plain text, not an error.
        return len(encode(piece, disallowed_special=())), 0
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        global _tokenizer_error_logged
        if not _tokenizer_error_logged:
            _tokenizer_error_logged = True
            logger.warning(
                "tiktoken failed on a piece of %d characters (%s: %s); such pieces are "
                'estimated (extproc_token_count_estimates_total{reason="tokenizer_error"})',
                len(piece),
                type(exc).__name__,
                str(exc)[:200],
            )
        return estimate_tokens(piece), _TOKENIZER_ERROR


def _count_pieces(
    encode: Callable[..., list[int]], texts: list[str], deadline: float
) -> tuple[int, int]:
    """Count `texts` piece by piece on this thread; past `deadline`, estimate the rest."""
    total = flags = 0
    for text in texts:
        start, size = 0, len(text)
        while start < size:
            if flags & _BUDGET or perf_counter() >= deadline:
                flags |= _BUDGET
                total += _estimate_span(text, start, size)
                break
            end, safe = _next_cut(text, start)
            if not safe:
                flags |= _HARD_CUT
            n, flag = _encode_piece(encode, text[start:end])
            total += n
            flags |= flag
            start = end
    return total, flags


class _Tally:
    """What a request contributes: fixed token counts plus the strings still to encode."""

    __slots__ = ("chars", "exact", "fixed", "texts")

    def __init__(self) -> None:
        self.fixed = 0
        self.texts: list[str] = []
        self.chars = 0
        self.exact = True

    def text(self, value: str) -> None:
        if value:
            self.texts.append(value)
            self.chars += len(value)


class _Job:
    """One long prompt being counted on the tokenizer threads. Its pieces are cut as they are
    handed out (texts[ti][pos:] is what is left), so an abandoned job costs no more work."""

    __slots__ = (
        "done",
        "dropped",
        "encode",
        "flags",
        "inflight",
        "left",
        "loop",
        "pos",
        "team",
        "texts",
        "ti",
        "tokens",
    )

    def __init__(
        self,
        team: str,
        encode: Callable[..., list[int]],
        texts: list[str],
        chars: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.team = team
        self.encode = encode
        self.texts = texts
        self.ti = 0  # the text the next piece comes from
        self.pos = 0  # where in it
        self.left = chars  # characters not handed out yet
        self.inflight: list[tuple[int, int, int]] = []  # (text index, start, end) being encoded
        self.tokens = 0
        self.flags = 0
        self.dropped = False
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()


_LEFT = operator.attrgetter("left")


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():  # the waiter may have been cancelled, or timed out
        done.set_result(None)


class _Scheduler:
    """The tokenizer threads and their queue: teams are served round-robin one piece at a time;
    within a team, the job with the least text left goes first. Shared by the whole process."""

    def __init__(self, threads: int = COUNT_THREADS) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._order: deque[str] = deque()  # teams with pieces to hand out, next served first
        self._queues: dict[str, list[_Job]] = {}
        self._running = 0  # pieces being encoded
        self._threads = [
            threading.Thread(target=self._work, name=f"extproc-tokens-{i}", daemon=True)
            for i in range(threads)
        ]
        self._started = False

    def submit(self, job: _Job) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                for thread in self._threads:
                    thread.start()
            jobs = self._queues.get(job.team)
            if jobs is None:
                self._queues[job.team] = [job]
                self._order.append(job.team)
            else:
                jobs.append(job)
            self._ready.notify_all()

    def drop(self, job: _Job) -> None:
        """The waiter is gone: hand out no more of its pieces (one being encoded finishes)."""
        with self._lock:
            self._drop(job)

    def settle(self, job: _Job) -> tuple[int, int]:
        """The job's tokens and flags; what is not counted yet is dropped and estimated."""
        with self._lock:
            if job.ti == len(job.texts) and not job.inflight and not job.dropped:
                return job.tokens, job.flags
            self._drop(job)
            rest = list(job.inflight)
            ti, pos, tokens = job.ti, job.pos, job.tokens
            flags = job.flags | _BUDGET
        texts = job.texts
        tokens += sum(_estimate_span(texts[i], start, end) for i, start, end in rest)
        if ti < len(texts):
            tokens += _estimate_span(texts[ti], pos, len(texts[ti]))
            tokens += sum(map(estimate_tokens, texts[ti + 1 :]))
        return tokens, flags

    def snapshot(self) -> tuple[dict[str, int], int]:
        """Jobs queued per team, and pieces being encoded (for tests and debugging)."""
        with self._lock:
            return {team: len(jobs) for team, jobs in self._queues.items()}, self._running

    def _drop(self, job: _Job) -> None:  # with the lock held
        job.dropped = True
        jobs = self._queues.get(job.team)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._queues[job.team]
                self._order.remove(job.team)

    def _take(self) -> tuple[_Job, int, int, int]:  # with the lock held, something queued
        team = self._order.popleft()
        jobs = self._queues[team]
        job = jobs[0] if len(jobs) == 1 else min(jobs, key=_LEFT)
        ti, start = job.ti, job.pos
        text = job.texts[ti]
        end, safe = _next_cut(text, start)
        if not safe:
            job.flags |= _HARD_CUT
        job.left -= end - start
        if end < len(text):
            job.pos = end
        else:
            job.ti, job.pos = ti + 1, 0
            if job.ti == len(job.texts):
                jobs.remove(job)  # all handed out
        if jobs:
            self._order.append(team)
        else:
            del self._queues[team]
        job.inflight.append((ti, start, end))
        self._running += 1
        return job, ti, start, end

    def _work(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # a bug: the job it hit ends at its budget, as an estimate
                logger.exception("token counting thread failed on a piece")

    def _step(self) -> None:
        with self._ready:
            while not self._order:
                self._ready.wait()
            job, ti, start, end = self._take()
        n, flag = _encode_piece(job.encode, job.texts[ti][start:end])
        with self._lock:
            self._running -= 1
            job.inflight.remove((ti, start, end))
            if job.dropped:
                return
            job.tokens += n
            job.flags |= flag
            finished = job.ti == len(job.texts) and not job.inflight
        if finished:
            try:
                job.loop.call_soon_threadsafe(_wake, job.done)
            except RuntimeError:  # its event loop is closed: nobody is waiting
                pass


_scheduler_instance: _Scheduler | None = None
_scheduler_lock = threading.Lock()


def _scheduler() -> _Scheduler:
    """The process's scheduler, started on first use (a forked child starts its own)."""
    global _scheduler_instance
    current = _scheduler_instance
    if current is not None and current.pid == os.getpid():
        return current
    with _scheduler_lock:
        if _scheduler_instance is None or _scheduler_instance.pid != os.getpid():
            _scheduler_instance = _Scheduler()
        return _scheduler_instance


class TokenCounter:
    """Counts tokens per model; safe to share between the event loop and worker threads."""

    def __init__(
        self,
        default_encoding: str = "cl100k_base",
        model_encodings: Mapping[str, str] | None = None,
        budget_s: float = DEFAULT_BUDGET_S,
    ) -> None:
        self._default = default_encoding
        # How long an async count may take (the wait for a thread included), and a sync one.
        self.budget_s = budget_s
        self.sync_budget_s = min(budget_s, SYNC_BUDGET_S)
        self._overrides: dict[str, str] = dict(model_encodings or {})
        # Encoding name -> Encoding, or None once it has failed to load.
        self._encodings: dict[str, tiktoken.Encoding | None] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._resolve = functools.lru_cache(maxsize=_MODEL_CACHE_SIZE)(self._resolve_uncached)

    # -- encodings ---------------------------------------------------------------------------

    def encoding_name_for(self, model: str) -> str:
        if not isinstance(model, str):
            return self._default
        override = self._overrides.get(model)
        if override is not None:
            return override
        return self._resolve(model)

    def _resolve_uncached(self, model: str) -> str:
        try:
            return tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            return self._default

    def preload(self, encodings: Iterable[str]) -> dict[str, str | None]:
        """Load encodings now (at start-up) so no request waits for a file or a download."""
        result: dict[str, str | None] = {}
        for name in encodings:
            self._encoding(name)
            result[name] = self._errors.get(name)
        return result

    def _encoding(self, name: str) -> tiktoken.Encoding | None:
        # The dict only ever grows, so the unlocked read is safe.
        if name in self._encodings:
            return self._encodings[name]
        with self._lock:
            # Another thread may have loaded it, or failed and warned, while we waited.
            if name in self._encodings:
                return self._encodings[name]
            try:
                loaded: tiktoken.Encoding | None = tiktoken.get_encoding(name)
            # Any failure (unknown name, no network, unreadable or corrupt file) means the
            # same thing here: count with the estimate rather than fail the request.
            except Exception as exc:
                loaded = None
                reason = f"{type(exc).__name__}: {exc}"
                self._errors[name] = reason
                logger.warning(
                    "tiktoken encoding %r is unavailable (%s); token counts that need it are "
                    "estimates (ceil(utf-8 bytes / 4)). To count exactly, put the encoding file "
                    "in the directory named by TIKTOKEN_CACHE_DIR (currently %s) or allow "
                    "tiktoken to download it.",
                    name,
                    reason,
                    os.environ.get("TIKTOKEN_CACHE_DIR") or "unset",
                )
            self._encodings[name] = loaded
            return loaded

    # -- counting ----------------------------------------------------------------------------

    def _finish(self, encoding_name: str, tally: _Tally, budget: float | None = None) -> TokenCount:
        enc = self._encoding(encoding_name)
        if enc is None:
            if tally.texts:
                _ESTIMATES["unavailable"].inc()
            n = sum(map(estimate_tokens, tally.texts))
            return TokenCount(tally.fixed + n, False)
        if tally.chars <= ASYNC_THREAD_THRESHOLD_CHARS:
            encode = enc.encode
            try:
                # disallowed_special=(): "<|endoftext|>" typed by a user is plain text.
                n = sum(len(encode(t, disallowed_special=())) for t in tally.texts)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # counted again below, the failing piece estimated
                pass
            else:
                return TokenCount(tally.fixed + n, tally.exact)
        deadline = perf_counter() + (self.sync_budget_s if budget is None else budget)
        n, flags = _count_pieces(enc.encode, tally.texts, deadline)
        _record(flags)
        return TokenCount(tally.fixed + n, tally.exact and not flags)

    async def _finish_async(
        self, encoding_name: str, tally: _Tally, team: str | None, budget: float | None
    ) -> TokenCount:
        if encoding_name not in self._encodings:
            # A first load reads a file (maybe downloads it): off the loop.
            await asyncio.to_thread(self._encoding, encoding_name)
        # Short prompts, and estimates whatever their size, are counted right here.
        if tally.chars <= ASYNC_THREAD_THRESHOLD_CHARS or self._encodings[encoding_name] is None:
            return self._finish(encoding_name, tally)
        enc = self._encodings[encoding_name]
        assert enc is not None
        return await self._count_off_loop(
            enc, tally, team or "", self.budget_s if budget is None else budget
        )

    async def _count_off_loop(
        self, enc: tiktoken.Encoding, tally: _Tally, team: str, budget: float
    ) -> TokenCount:
        started = perf_counter()
        loop = asyncio.get_running_loop()
        job = _Job(team, enc.encode, tally.texts, tally.chars, loop)
        scheduler = _scheduler()
        scheduler.submit(job)
        try:
            async with asyncio.timeout(budget):
                await job.done
        except TimeoutError:
            pass  # settled below: what is not counted yet is estimated
        except BaseException:
            scheduler.drop(job)  # cancelled (Envoy gave up on the request): stop counting
            raise
        n, flags = scheduler.settle(job)
        TOKEN_COUNT_SECONDS.observe(perf_counter() - started)
        _record(flags)
        return TokenCount(tally.fixed + n, tally.exact and not flags)

    # The sync counts run on the calling thread: texts over ASYNC_THREAD_THRESHOLD_CHARS are
    # counted piece by piece and estimated past `budget` (default: sync_budget_s). The async
    # counts wait for the tokenizer threads at most `budget` (default: budget_s), in the queue
    # of `team`.

    def count_text(self, model: str, text: str, *, budget: float | None = None) -> TokenCount:
        tally = _Tally()
        if isinstance(text, str):
            tally.text(text)
        else:
            tally.exact = False
        return self._finish(self.encoding_name_for(model), tally, budget)

    def count_chat(
        self,
        model: str,
        messages: list[Any],
        tools: list[Any] | None = None,
        *,
        budget: float | None = None,
    ) -> TokenCount:
        tally = _chat_tally(model, messages, tools)
        return self._finish(self.encoding_name_for(model), tally, budget)

    async def count_chat_async(
        self,
        model: str,
        messages: list[Any],
        tools: list[Any] | None = None,
        *,
        team: str | None = None,
        budget: float | None = None,
    ) -> TokenCount:
        tally = _chat_tally(model, messages, tools)
        return await self._finish_async(self.encoding_name_for(model), tally, team, budget)

    def count_prompt(self, model: str, prompt: Any, *, budget: float | None = None) -> TokenCount:
        """Legacy completions ``prompt``: str, list[str], list[int] or list[list[int]]."""
        return self._finish(self.encoding_name_for(model), _prompt_tally(prompt), budget)

    async def count_prompt_async(
        self, model: str, prompt: Any, *, team: str | None = None, budget: float | None = None
    ) -> TokenCount:
        tally = _prompt_tally(prompt)
        return await self._finish_async(self.encoding_name_for(model), tally, team, budget)

    def count_embedding_input(
        self, model: str, input: Any, *, budget: float | None = None
    ) -> TokenCount:
        """Embeddings ``input``: the same shapes as a completions prompt."""
        return self._finish(self.encoding_name_for(model), _prompt_tally(input), budget)

    async def count_embedding_input_async(
        self, model: str, input: Any, *, team: str | None = None, budget: float | None = None
    ) -> TokenCount:
        tally = _prompt_tally(input)
        return await self._finish_async(self.encoding_name_for(model), tally, team, budget)


# -- request walkers: never raise on odd shapes, count what can be counted ---------------------


def _chat_tally(model: str, messages: Any, tools: Any) -> _Tally:
    tally = _Tally()
    if model in _LEGACY_CHAT_MODELS:
        per_message, per_name = _LEGACY_TOKENS_PER_MESSAGE, _LEGACY_TOKENS_PER_NAME
    else:
        per_message, per_name = _TOKENS_PER_MESSAGE, _TOKENS_PER_NAME
    tally.fixed = _REPLY_PRIMING
    if not isinstance(messages, list):
        tally.exact = False
        messages = ()
    for message in messages:
        if not isinstance(message, dict):
            tally.exact = False
            continue
        tally.fixed += per_message
        for key, value in message.items():
            if isinstance(value, str):
                tally.text(value)
                if key == "name":
                    tally.fixed += per_name
            elif value is None:
                continue
            elif key == "content":
                _content_parts(tally, value)
            elif key == "tool_calls":
                tally.exact = False
                if isinstance(value, list):
                    for call in value:
                        if isinstance(call, dict):
                            _function(tally, call.get("function"))
            elif key == "function_call":
                tally.exact = False
                _function(tally, value)
            else:
                tally.exact = False
    if tools:
        tally.exact = False
        try:
            tally.text(orjson.dumps(tools).decode())
        except TypeError:  # orjson.JSONEncodeError: not JSON-shaped; nothing to count
            pass
    return tally


def _content_parts(tally: _Tally, content: Any) -> None:
    if not isinstance(content, list):
        tally.exact = False
        return
    for part in content:
        if isinstance(part, str):
            tally.text(part)
            continue
        if not isinstance(part, dict):
            tally.exact = False
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            tally.text(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            tally.text(part["refusal"])
        elif kind == "image_url":
            tally.fixed += IMAGE_TOKENS_ESTIMATE
            tally.exact = False
        else:
            # Audio, files and unknown parts: no basis for a count; a stray text still counts.
            tally.exact = False
            text = part.get("text")
            if isinstance(text, str):
                tally.text(text)


def _function(tally: _Tally, function: Any) -> None:
    if not isinstance(function, dict):
        return
    for field in ("name", "arguments"):
        value = function.get(field)
        if isinstance(value, str):
            tally.text(value)


def _token_ids(tally: _Tally, ids: list[Any]) -> bool:
    """Count a list of token ids; False if it holds anything but ints."""
    # set(map(type, ...)) runs in C: cheap even for prompts of 100k token ids.
    if set(map(type, ids)) <= {int}:
        tally.fixed += len(ids)
        return True
    return False


def _prompt_tally(prompt: Any) -> _Tally:
    tally = _Tally()
    if isinstance(prompt, str):
        tally.text(prompt)
    elif isinstance(prompt, list):
        if not _token_ids(tally, prompt):
            for item in prompt:
                if isinstance(item, str):
                    tally.text(item)
                elif type(item) is int:
                    tally.fixed += 1
                elif not (isinstance(item, list) and _token_ids(tally, item)):
                    tally.exact = False
    elif prompt is not None:
        tally.exact = False
    return tally
