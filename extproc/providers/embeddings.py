"""OpenAI's `/v1/embeddings` behind a provider's own embeddings API: what the translations
(gemini.py, bedrock.py: base.Embeddings) share, and `encode`, the answer's vectors in the
encoding the client asked for.

The request: OpenAI's parameters are `model`, `input`, `dimensions`, `encoding_format` and
`user`; any other is refused (400 naming it), as chat's translations refuse what they cannot
serve. `input` is a string or a non-empty array of strings, none empty (OpenAI refuses an empty
string too); arrays of token ids, which OpenAI also takes, are refused (400 naming `input`):
these providers take text, and the token ids of OpenAI's tokenizers mean nothing to them.
`user` has no effect on a vector: not sent. `encoding_format` is not the provider's business
(each answers floats): a translation's `answer` always gives float lists, and `encode` turns
them into what the client asked for.

The answer: OpenAI's list (`object: list`, `data` of `{object: embedding, index, embedding}` in
input order, `model`: the client's name), `usage` (`prompt_tokens` = `total_tokens`) only when
the provider reported a count. A 2xx answer without its vectors raises ValueError (the caller
answers 502)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import GatewayError, bad_request

PARAMETERS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
ENCODINGS = ("float", "base64")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unsupported(param: str, provider: str) -> GatewayError:
    return bad_request(
        f"`{param}` is not supported by this model's provider ({provider})",
        "unsupported_parameter",
        param,
    )


def check(body: Mapping[str, Any], provider: str) -> None:
    """Refuses (400 naming it) a parameter OpenAI's embeddings do not have, and an
    `encoding_format` or `user` not of OpenAI's shape. `provider`: its name, for the message."""
    for key, value in body.items():
        if key not in PARAMETERS and value is not None:
            raise unsupported(key, provider)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise bad_request(
            "`encoding_format` must be 'float' or 'base64'", "invalid_value", "encoding_format"
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("`user` must be a string", "invalid_type", "user")


def texts(body: Mapping[str, Any], provider: str) -> list[str]:
    """The texts to embed, in order; raises the 400 (naming `input`) of any other input."""
    value = body.get("input")
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items = list(value)
    elif (
        isinstance(value, list)
        and value
        and (
            all(_is_int(v) for v in value)
            or all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value)
        )
    ):
        raise bad_request(
            f"`input` as token ids is not supported by this model's provider ({provider} takes "
            "text)",
            "unsupported_value",
            "input",
        )
    else:
        raise bad_request(
            "`input` must be a string or a non-empty array of strings", "invalid_type", "input"
        )
    for i, text in enumerate(items):
        if not text:
            where = "input" if isinstance(value, str) else f"input[{i}]"
            raise bad_request(f"`{where}` is an empty string", "invalid_value", "input")
    return items


def at_most(items: Sequence[str], most: int, provider: str) -> None:
    """Refuses (400 naming `input`) more texts than the provider takes in one request."""
    if len(items) > most:
        what = "one text" if most == 1 else f"at most {most} texts"
        raise bad_request(
            f"`input` holds {len(items)} texts; this model's provider ({provider}) takes {what} "
            "in one request",
            "unsupported_value",
            "input",
        )


def dimensions(body: Mapping[str, Any]) -> int | None:
    """The client's `dimensions`, or None when it set none; raises the 400 of a value that is
    not a positive integer."""
    value = body.get("dimensions")
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise bad_request("`dimensions` must be a positive integer", "invalid_value", "dimensions")
    return int(value)


def dimensions_refused(value: int, provider: str, allowed: Sequence[int]) -> GatewayError:
    """A `dimensions` the model cannot give (`allowed`: those it can; none: only its own)."""
    if not allowed:
        said = "this model has a fixed size and takes no `dimensions`"
    elif len(allowed) == 1:
        said = f"this model's vectors have {allowed[0]} dimensions"
    else:
        said = "this model takes " + ", ".join(map(str, allowed))
    return bad_request(
        f"`dimensions` {value} is not supported by this model's provider ({provider}: {said})",
        "unsupported_value",
        "dimensions",
    )


# -- the answer ---------------------------------------------------------------------------------


def vector(value: Any) -> list[float]:
    """A provider's vector (a non-empty JSON array of numbers) as floats; ValueError else."""
    if not isinstance(value, list) or not value:
        raise ValueError("an embedding is not a non-empty array")
    out = []
    for x in value:
        if not isinstance(x, int | float) or isinstance(x, bool):
            raise ValueError("an embedding holds something that is not a number")
        out.append(float(x))
    return out


def count(value: Any) -> int | None:
    """A token count (a non-negative integer, or a number that is one: Vertex AI's statistics
    are JSON numbers of a protobuf Value), or None."""
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    return None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A response header's value, whatever the case of its name."""
    value = headers.get(name) or headers.get(name.lower())
    if value is not None:
        return value
    wanted = name.lower()
    for key, found in headers.items():
        if key.lower() == wanted:
            return found
    return None


def header_count(headers: Mapping[str, str], name: str) -> int | None:
    value = header(headers, name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def embeddings_list(
    vectors: Sequence[list[float]], model: str, prompt_tokens: int | None
) -> dict[str, Any]:
    """OpenAI's embeddings answer for the client's `model` name (floats; see `encode`)."""
    out: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": values}
            for i, values in enumerate(vectors)
        ],
        "model": model,
    }
    if prompt_tokens is not None:
        out["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return out


def encode(openai_answer: dict[str, Any], encoding_format: str | None) -> dict[str, Any]:
    """OpenAI's embeddings answer (float lists, as a translation's `answer` gives it) in the
    client's `encoding_format`: `base64` makes each vector the base64 of its little-endian
    float32 values, as OpenAI's API does (and as OpenAI's SDKs ask by default, and decode);
    anything else (`float`, None) leaves the answer as it is. A vector that float32 cannot
    hold raises ValueError."""
    if encoding_format != "base64":
        return openai_answer
    data = []
    for item in openai_answer.get("data") or ():
        values = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(values, list):
            try:
                packed = struct.pack(f"<{len(values)}f", *values)
            except (struct.error, OverflowError) as exc:
                raise ValueError(f"an embedding cannot be encoded as float32: {exc}") from None
            item = {**item, "embedding": base64.b64encode(packed).decode("ascii")}
        data.append(item)
    return {**openai_answer, "data": data}
