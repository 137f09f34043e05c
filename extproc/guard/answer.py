"""Response guards on a JSON answer the downstream stage read whole (streams are judged by the
wire format's guarded relay, chunk by chunk)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from . import pipeline as guard

if TYPE_CHECKING:
    from ..admission import Admission


async def judge(admission: Admission, raw: bytes) -> bytes | None:
    """The masked answer, None if unchanged; a block raises (the answer is replaced by the
    error while its headers are still held). Judged in the context of the prompt as the backend
    received it (Admission.prompt_turns)."""
    request = admission.request
    assert request is not None
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    fmt, guards = admission.wire, admission.response_guards
    dropped = fmt.drop_logprobs(answer)
    slots = fmt.answer_slots(admission.endpoint, answer)
    if not slots:
        return orjson.dumps(answer) if dropped else None
    verdicts = await guard.run_local_async(guards, slots)
    admission.stop_if_blocked(verdicts, "response")
    external = await guard.run_external(
        admission.services.guard_client,
        guards,
        "response",
        admission.team,
        request.model,
        slots,
        admission.prompt_turns,
        trace=admission.trace,
    )
    verdicts += external
    admission.stop_if_blocked(verdicts, "response")
    changed = guard.apply_rewrites(external, slots) or dropped
    changed |= any(v.action == "rewrite" for v in verdicts)
    admission.record("response", verdicts)
    return orjson.dumps(answer) if changed else None
