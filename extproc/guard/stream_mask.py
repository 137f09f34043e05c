"""Masking a streamed response whose text arrives in deltas split anywhere.

A secret can straddle deltas ("sk-pro" + "j-abc..."), and a match can change as text arrives
(the domain of "a@b.co" may continue as "a@b.com.au"). `StreamMasker` holds back just enough
text to be sure, and releases the rest already masked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .detectors import mask
from .types import Span, Verdict

if TYPE_CHECKING:
    from .pipeline import CompiledGuard

# Released text kept in front of the unreleased text, beyond `holdback`, so that boundary
# checks looking behind a match (e.g. "not preceded by a digit") see what the whole text has.
_LOOKBEHIND = 16


class StreamMasker:
    """Masks a text fed in pieces so that the pieces out, joined, equal `mask(text, find(text))`.

    Release rule: with n characters seen, everything before n - holdback is released, and so is
    any match starting before n - holdback, whole and masked, however far it reaches. Such a
    match is final: it is at most `holdback` long, so it and whatever the matcher read to decide
    it lie within the text seen. A match starting later may still grow ("a@b.co" + "m"), shrink
    or vanish, so the text from n - holdback on is held: never more than `holdback` characters.

    What `find` must do for this to hold (the detectors of `detectors` do):
    - a match attempt at position i reads only [i - 16, i + holdback);
    - scanning a window of the text finds the same matches as scanning the whole text, except
      those starting in the window's first 16 characters (true when matches of one pattern
      never start inside one another, see `detectors`).

    `find` sees the held text and the last `holdback + 16` released characters, never the whole
    stream. A match the window cuts at its left edge starts in its first 16 characters and is at
    most `holdback` long, so it ends before the held text and cannot displace a match in it.
    """

    __slots__ = ("_buf", "_context", "_find", "_holdback", "_released", "_template", "counts")

    def __init__(
        self, find: Callable[[str], list[Span]], holdback: int, template: str = "[{KIND}]"
    ) -> None:
        if holdback < 0:
            raise ValueError(f"holdback must be >= 0, got {holdback}")
        self._find = find
        self._holdback = holdback
        self._context = holdback + _LOOKBEHIND
        self._template = template
        self._buf = ""  # released context, then held text
        self._released = 0  # where the held text starts in _buf
        self.counts: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Characters seen but not yet released: at most `holdback`."""
        return len(self._buf) - self._released

    def feed(self, text: str) -> str:
        """The text that is safe to release now, masked."""
        if not text:
            return ""
        self._buf += text
        final = len(self._buf) - self._holdback
        if final <= self._released:
            return ""  # nothing can be final yet: spare the scan
        return self._release(final)

    def flush(self) -> str:
        """End of stream: everything still held, masked. The masker is then empty again."""
        out = self._release(len(self._buf)) if self.held else ""
        self._buf = ""
        self._released = 0
        return out

    def _release(self, final: int) -> str:
        buf, start = self._buf, self._released
        taken: list[Span] = []
        end = final
        for span in self._find(buf):
            if span.start < start:
                continue  # released already, or a match cut by the window's left edge
            if span.start >= final:
                break
            taken.append(Span(span.start - start, span.end - start, span.kind))
            end = max(end, span.end)
            self.counts[span.kind] = self.counts.get(span.kind, 0) + 1
        out = mask(buf[start:end], taken, self._template)
        # Keep the released tail the next scan needs in front of the held text.
        drop = max(0, end - self._context)
        self._buf = buf[drop:]
        self._released = end - drop
        return out


def stream_block(masker: StreamMasker, owners: Mapping[str, CompiledGuard]) -> Verdict | None:
    """The verdict that ends a guarded stream, from what its masker found: a deny guard's
    match, or a match of a guard whose action is block (a masking guard's is masked)."""
    for kind in masker.counts:
        guard = owners.get(kind)
        if guard is None:
            continue
        if guard.deny is not None:
            return Verdict("block", guard.name, reason=f"matched {kind}")
        if guard.spec.action == "block":
            return Verdict("block", guard.name, reason="sensitive data")
    return None
