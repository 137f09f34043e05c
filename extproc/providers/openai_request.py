"""The client's OpenAI request, read the same way for every provider that speaks another API
(anthropic.py, bedrock.py, gemini.py): each takes what it reads here and decides what its own
API makes of it. A refusal is a 400 naming the parameter (where a function takes `provider`,
the provider's name as the client's messages say it, the message names the provider too).

Chat completions: the OpenAI parameters a provider may have no counterpart for, and their
neutral values (`NEUTRAL`), are refused unless they have that value (`check_parameters`); a
body part that does not have the shape OpenAI's API gives it is refused whole
(`shape_checked`: what reads a body part here raises KeyError, TypeError... for one that is not
of OpenAI's shape, the client's 400 under it). Read here: the output cap (`max_tokens`: an
integer of at least 1, never a 0 taken as unset), the stop sequences, a message's text and
image parts (`content_parts`, `text_only`, `text_parts`), an image's `data:` URL (`data_url`),
an assistant's text and its tool calls' arguments, and the messages as the alternating turns
the providers take (`add_turn`).

Embeddings: OpenAI's parameters are `model`, `input`, `dimensions`, `encoding_format` and
`user`; any other is refused (`check_embeddings`). `input` is a string or a non-empty array of
strings, none empty (OpenAI refuses an empty string too); arrays of token ids, which OpenAI
also takes, are refused (`texts`): these providers take text, and the token ids of OpenAI's
tokenizers mean nothing to them. `user` has no effect on a vector: not sent.
`encoding_format` is not the provider's business (each answers floats): openai_answer.encode
gives the vectors in the encoding the client asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from ..errors import GatewayError, bad_request


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unsupported(param: str, provider: str) -> GatewayError:
    return bad_request(
        f"`{param}` is not supported by this model's provider ({provider})",
        "unsupported_parameter",
        param,
    )


# -- chat completions -------------------------------------------------------------------------

# OpenAI chat parameters a provider may have no counterpart for, and their neutral values (an
# empty tuple: no value is neutral): a request that sets one to anything else is refused rather
# than served differently than asked.
NEUTRAL: Mapping[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "seed": (),
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
}
# Taken and translated by every provider, or without effect on what the model produces.
HANDLED = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
        "user", "metadata", "store", "service_tier",
    }
)  # fmt: skip


def check_parameters(
    body: Mapping[str, Any], provider: str, handled: frozenset[str] = HANDLED
) -> None:
    """Refuses a parameter set (not null) that the provider neither takes (`handled`: what its
    translation takes, HANDLED and any more) nor has at its neutral value (NEUTRAL)."""
    for key, value in body.items():
        if key in handled or value is None:
            continue
        neutral = NEUTRAL.get(key)
        if neutral is None or value not in neutral:
            raise unsupported(key, provider)


@contextmanager
def shape_checked() -> Iterator[None]:
    """Around a translation that reads the body as OpenAI's API shapes it: what it finds
    otherwise (a missing key, a string for an object, ...) is the client's 400."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise bad_request(
            f"The request does not have the shape OpenAI's API defines ({type(exc).__name__}: "
            f"{str(exc)[:200]})",
            "invalid_request",
        ) from None


def below_minimum(name: str, value: int) -> GatewayError:
    """OpenAI's refusal of an integer parameter below 1."""
    return bad_request(
        f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} "
        "instead.",
        "integer_below_min_value",
        name,
    )


def max_tokens(body: Mapping[str, Any], default: int) -> int:
    """The output cap the client set (`max_completion_tokens`, else `max_tokens`), or
    `default`; a value that is not an integer of at least 1 is refused, as OpenAI refuses it,
    rather than replaced by the default."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise bad_request(
                f"Invalid type for '{name}': expected an integer", "invalid_type", name
            )
        if value < 1:
            raise below_minimum(name, value)
        return int(value)
    return default


def stop_sequences(body: Mapping[str, Any]) -> list[str]:
    """The client's `stop` (a string, or a list of strings) as a list, without the empty
    strings: an empty stop sequence stops nothing."""
    stop = body.get("stop")
    if not stop:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop is not a string or a list of strings")
    return [s for s in stops if s]


def unsupported_role(role: Any, i: int) -> GatewayError:
    return bad_request(
        f"messages[{i}].role {role!r} is not supported by this model's provider",
        "unsupported_value",
        f"messages[{i}].role",
    )


def add_turn(turns: list[dict[str, Any]], role: str, parts: list[Any], key: str) -> None:
    """A message's `parts` added to the conversation's `turns` (`{"role": role, key: parts}`):
    none, nothing; of the last turn's role, merged into it, as the providers' APIs want the
    roles alternating (tool results, for one, are a user turn there)."""
    if not parts:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(parts)
    else:
        turns.append({"role": role, key: parts})


def text_only(content: Any, where: str) -> str:
    """A content that may hold text only (a string, or text parts joined by newlines); any
    other part is refused naming the content (`where`). The system prompts of anthropic.py and
    bedrock.py are read so: their refusal's `param` is the content, where text_parts names
    the part."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content or ():
        if part.get("type") != "text":
            raise bad_request(f"{where}: only text is allowed here", "unsupported_value", where)
        parts.append(part["text"])
    return "\n".join(parts)


def text_parts(content: Any, where: str) -> list[str]:
    """A content that may hold text only, as its texts in order (none for no content); any
    other part is refused naming the part (`where[j]`)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    out = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise bad_request(
                f"{where}[{j}]: only text is allowed here", "unsupported_value", f"{where}[{j}]"
            )
        if not isinstance(part["text"], str):
            raise TypeError(f"{where}[{j}].text is not a string")
        out.append(part["text"])
    return out


def content_parts(content: Any, where: str) -> Iterator[tuple[str, str, str]]:
    """A message's content (a string, or text and image parts) as (kind, value, where it is)
    in order: ("text", the text, ...) for each text that says something (a blank one, which
    the providers refuse or ignore, is left out), ("image_url", the URL, `where[j]`) for each
    image. Any other part is refused naming its type. Read as the caller goes, so the refusals
    come in the order of the parts, the caller's own (of an image) among them."""
    if content is None:
        return
    if isinstance(content, str):
        if content.strip():
            yield "text", content, where
        return
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            text = part["text"]
            if not isinstance(text, str):
                raise TypeError(f"{where}[{j}].text is not a string")
            if text.strip():
                yield "text", text, f"{where}[{j}]"
        elif kind == "image_url":
            yield "image_url", part["image_url"]["url"], f"{where}[{j}]"
        else:
            raise bad_request(
                f"{where}[{j}]: content of type {kind!r} is not supported by this model's provider",
                "unsupported_value",
                f"{where}[{j}].type",
            )


def data_url(url: str, where: str, typed: bool = False) -> tuple[str, str]:
    """A base64 `data:` URL's (media type, base64 data), refused (naming the image, `where`)
    when it is not base64 or holds no data; `typed`: a media type is needed too."""
    header, _, data = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    if encoding != "base64" or not data or (typed and not media_type):
        said = "base64 with a media type" if typed else "base64"
        raise bad_request(f"{where}: a data URL must be {said}", "invalid_value", where)
    return media_type, data


def inline_image(
    url: str, where: str, provider: str, accepted: Mapping[str, str], typed: bool = False
) -> tuple[str, str]:
    """An image for a provider that takes its bytes only (no web URL): (the provider's name
    for its type, the base64 data) of a `data:` URL. `accepted`: media type -> that name (the
    names listed when a type is refused); a web URL, or a type not in it, is refused naming
    the image (`where`)."""
    if not url.startswith("data:"):
        raise bad_request(
            f"{where}: this model's provider ({provider}) takes an image's bytes (a base64 "
            "data: URL), not an image URL",
            "unsupported_value",
            f"{where}.image_url",
        )
    media_type, data = data_url(url, where, typed)
    name = accepted.get(media_type.lower())
    if name is None:
        names = ", ".join(dict.fromkeys(accepted.values()))
        raise bad_request(
            f"{where}: images of type {media_type!r} are not supported by this model's provider "
            f"({provider}: {names})",
            "unsupported_value",
            f"{where}.image_url",
        )
    return name, data


def assistant_content(message: Mapping[str, Any]) -> Any:
    """An assistant message's content, its parts as one text: they are text, or a refusal
    (text the model said)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text") or p.get("refusal") or "" for p in content)
    return content


def tool_arguments(call: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A tool call's arguments (JSON text; none: `{}`) as the JSON object the providers take:
    a value that is not an object is wrapped as `{"value": ...}`. Text that is not JSON is
    refused naming the message's `tool_calls` (`where`)."""
    arguments = call["function"].get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise bad_request(f"{where}: arguments are not JSON", "invalid_value", where) from None
    return parsed if isinstance(parsed, dict) else {"value": parsed}


# -- embeddings -------------------------------------------------------------------------------

EMBEDDINGS_PARAMETERS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
ENCODINGS = ("float", "base64")


def check_embeddings(body: Mapping[str, Any], provider: str) -> None:
    """Refuses a parameter OpenAI's embeddings do not have, and an `encoding_format` or
    `user` not of OpenAI's shape."""
    for key, value in body.items():
        if key not in EMBEDDINGS_PARAMETERS and value is not None:
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
