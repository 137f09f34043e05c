"""The relay of a Messages event stream from a backend that speaks Anthropic's API itself: every
chunk goes on untouched; the usage is read on the way (the input at `message_start`, the output
at `message_delta`), and what was produced is measured for a stream cut short.

The reading is the Anthropic provider's (providers/anthropic.py StreamTranslator): one reader of
Anthropic's events, whether the client gets them as they are (here) or as OpenAI's chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...providers.anthropic import StreamTranslator

if TYPE_CHECKING:
    from ...guard.types import Verdict
    from ...usage import Usage


class MessagesRelay:
    """sse.RelayedStream for a native Messages stream."""

    __slots__ = ("_reader", "error_code", "events", "partial_usage", "usage")

    # Settled by its usage report, which comes with the answer's end (sse.RelayedStream).
    finished = False

    def __init__(self) -> None:
        self._reader = StreamTranslator("", include_usage=True)
        self.usage: Usage | None = None
        self.partial_usage: Usage | None = None
        self.error_code: str | None = None
        self.events = 0

    def feed(self, chunk: bytes, end_of_stream: bool) -> None:
        reader = self._reader
        if reader.done:
            return None
        try:
            reader.feed(chunk)
        except Exception:  # the reader should not raise; the client's bytes go on regardless
            reader.done = True
            return None
        self.events += 1
        if reader.failed is not None:
            self.error_code = reader.failed.code
        if reader.finish_reason is not None:
            # message_delta carries the final usage (its output_tokens are cumulative).
            self.usage = reader.usage
        elif self.usage is None:
            self.partial_usage = reader.partial_usage
        return None

    @property
    def expects_usage(self) -> bool:
        # The text is kept whatever comes: a stream cut before message_start is counted from it.
        return False

    @property
    def text(self) -> str:
        return self._reader.text

    @property
    def blocked(self) -> Verdict | None:
        return None  # a guarded stream has its own relay (guarded_stream.py)
