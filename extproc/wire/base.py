"""What the request path asks of an API's wire format, and the neutral shapes it gets back.

The stages know a request as an Endpoint (which operation, at which path) and a ParsedRequest;
how an API spells its request bodies, answers, stream events and errors is behind WireFormat.
Each format is one module under extproc/wire/, registered in extproc/wire/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..errors import GatewayError, bad_request

if TYPE_CHECKING:
    from ..guard.pipeline import CompiledGuard
    from ..guard.texts import Slot
    from ..guard.types import Span
    from ..sse import RelayedStream
    from ..tokens import TokenCount, TokenCounter
    from ..usage import Usage


class Operation(Enum):
    """What a request asks for, whatever API it speaks."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    COUNT_TOKENS = "count_tokens"  # the prompt's size, answered by the gateway
    # A call on an object a backend stores (a stored Response, a file, a batch): passed to the
    # backend that stores it, for the team that owns it (ownership.py).
    STORED = "stored"
    # OpenAI's Files and Batch APIs (batches.py): a batch's input file uploaded (read, checked
    # and counted), a batch created (reserved), the team's own files or batches listed.
    UPLOAD = "upload"
    BATCH = "batch"
    LIST_STORED = "list_stored"
    # Passed to the model's backend as they are: no output counted in tokens unless the answer
    # reports some (TOKENLESS); identity, allow-lists, request quotas, guards and audit apply.
    IMAGE = "image"
    SPEECH = "speech"
    TRANSCRIPTION = "transcription"
    MODERATION = "moderation"
    RERANK = "rerank"
    LIST_MODELS = "list_models"
    GET_MODEL = "get_model"


# Operations whose answers are not text: the gateway reads a usage report when the answer has
# one (an image model's tokens), and counts no output of its own.
TOKENLESS = frozenset(
    {
        Operation.IMAGE,
        Operation.SPEECH,
        Operation.TRANSCRIPTION,
        Operation.MODERATION,
        Operation.RERANK,
    }
)


# The kinds of object a backend stores for the gateway (Endpoint.kind): ownership.py records
# which team owns each.
RESPONSE_OBJECT = "response"
FILE_OBJECT = "file"
BATCH_OBJECT = "batch"


@dataclass(frozen=True, slots=True)
class Endpoint:
    operation: Operation
    # The API's path for it, as the gateway reports it (metadata, audit record, errors): one
    # spelling per endpoint, whatever query string or trailing slash the client sent.
    path: str
    form: bool = False  # its body is multipart/form-data, not JSON
    # The kind of stored object it creates, lists or calls on (ownership.RESPONSE, ...).
    kind: str = ""


@dataclass(slots=True)
class ParsedRequest:
    """A validated request body; `body` is the client's JSON, which guards and the model
    rewrite change in place."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for the stream's usage report itself
    # The most output the client allowed, all answers together (the backend is told it); the
    # cap of the gateway's own count. None: the client set none.
    output_cap: int | None = None
    answers: int = 1  # how many answers it asked for: a default maximum applies to each
    # A multipart/form-data body as the client sent it (`body` then holds its text fields): it
    # goes to the backend as it is, but for the model's name (wire/openai/form.py).
    form: bytes | None = None


# A guarded relay's factory: (find, holdback, owners) -> the relay (guard.pipeline.stream_finder).
GuardedRelay = Callable[
    ["Callable[[str], list[Span]]", int, "dict[str, CompiledGuard]"], "RelayedStream"
]


class ClientStream(Protocol):
    """An OpenAI chat completions chunk stream (`data: {...}` events, an error chunk, the usage
    chunk, `data: [DONE]`), as it arrives in pieces split anywhere, to the client API's event
    stream."""

    def feed(self, piece: bytes) -> bytes:
        """Each piece in, the client's events it completes out (b"" when none). Never raises on
        bad input; nothing is held back longer than the chunk it waits for."""
        ...

    def end(self) -> bytes:
        """The chat stream ended (end of the HTTP body): what still closes the client's stream
        when the chat stream had finished its answer (a finish_reason came) but not said
        `[DONE]` or its usage; b"" when it was closed already or was cut before its finish (a
        client then sees it was cut)."""
        ...


class ChatBridge(Protocol):
    """A client API served by backends that speak OpenAI's chat completions (and, through the
    providers' translations of chat completions, by every other backend): the request to chat,
    the answers back. OpenAI's own format has none. A backend that speaks the client's API
    itself (config.Backend.apis) gets the request as it is (routing.served_natively)."""

    def request(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """The client's validated body as an OpenAI chat completions body, `model` unchanged; a
        stream asks for its usage report (`stream_options.include_usage`). Raises a 400
        GatewayError naming the parameter for what chat completions cannot carry."""
        ...

    def answer(
        self, completion: dict[str, Any], model: str, request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A 2xx OpenAI chat completion as the client's answer, naming `model`; `request`: the
        client's body, for an API whose answers repeat the request's settings."""
        ...

    def stream(
        self, model: str, prompt_tokens: int, request: Mapping[str, Any] | None = None
    ) -> ClientStream:
        """A translator for one streamed answer; `prompt_tokens`: the gateway's count, for an
        API that reports the prompt's size before the chat stream's usage comes; `request`: the
        client's body, as for `answer`."""
        ...


class WireFormat(Protocol):
    """One API's wire format: everything the request path needs that depends on how the API
    spells its bodies, answers, stream events and errors."""

    name: str  # the registry's key, and the hand-over's (contract.Handover.wire)
    bridge: ChatBridge | None  # None: the API is OpenAI's chat completions' own
    # The relay of a stream of the API's own events that response guards judge (find,
    # holdback, owners: guard.pipeline.stream_finder); None: the API's guarded streams are judged
    # as chat chunks, so such a request goes as chat completions (routing.served_natively).
    own_guarded_relay: GuardedRelay | None
    # The prefix of the API's own request headers (Anthropic's version, betas, ...): they
    # reach a backend that speaks the API, never one the request is translated for. "" for
    # none.
    own_header_prefix: str

    def owns(self, path: str) -> bool:
        """The path is under this API's (its refusals, even before the request is routed, are
        in this API's error shape). `path` comes without query string or trailing slash."""
        ...

    def route(self, method: str, path: str) -> tuple[Endpoint, str | None] | None:
        """The endpoint a request line names and, for a GET of one model, its id; None when
        the path is none of this API's. `path` comes without query string or trailing slash.
        Raises the 405 of a known path asked with the wrong method."""
        ...

    def parse(self, endpoint: Endpoint, raw: bytes) -> ParsedRequest:
        """The body validated (raises a 400 GatewayError)."""
        ...

    async def count_prompt(
        self,
        tokens: TokenCounter,
        parsed: ParsedRequest,
        *,
        team: str | None,
        budget: float | None,
    ) -> TokenCount:
        """The prompt's tokens, as the backend will read them (TokenCounter never fails)."""
        ...

    def stored_references(self, body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """The stored objects the request builds on, as (kind, id): a previous Response
        (ownership.RESPONSE), a file by id (ownership.FILE). Each must be the team's, stored by
        the backend the request goes to."""
        ...

    def unstored(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The body with the backend told not to store the answer for later calls, for a
        request Envoy may send to any of several backends (a later call could not find it);
        None when the request stores nothing."""
        ...

    def stored_object(self, raw: bytes) -> str | None:
        """The id of the object a 2xx answer of the API, from a backend that speaks it, had the
        backend store for later calls (a stored Response); None when it stored none."""
        ...

    def token_count_body(self, tokens: int) -> bytes:
        """The answer to a request of the API's token count endpoint (Operation.COUNT_TOKENS),
        which the gateway answers itself with its count of the prompt."""
        ...

    def request_slots(self, endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
        """The request's texts, in order, for guards to judge, mask and rewrite in place."""
        ...

    def span_attributes(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request's gen_ai.request.* span attributes besides the model."""
        ...

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        """The body re-encoded to ask the backend for a stream's usage report, which the
        client did not ask for (the relay then cuts it out: strip_usage_chunk)."""
        ...

    def answer_usage(self, answer: Any) -> Usage | None:
        """The backend's usage report in a JSON answer (decoded), if it is well formed."""
        ...

    def answer_text(self, answer: Any) -> str:
        """The text a JSON answer produced, for the gateway's own count."""
        ...

    def answer_slots(self, endpoint: Endpoint, answer: Any) -> list[Slot]:
        """A JSON answer's texts, for the response guards."""
        ...

    def drop_logprobs(self, answer: Any) -> bool:
        """Remove what repeats the answer's text around a mask (token log-probabilities); True
        when there was some."""
        ...

    def stream_relay(self, strip_usage_chunk: bool) -> RelayedStream:
        """The fast relay of a stream: usage and text read on the way, chunks relayed as they
        are unless `strip_usage_chunk` cuts the usage report the gateway asked for. (A stream
        with response guards is judged as OpenAI's chunks, a bridged API's before its bridge
        translates them: wire.openai's GuardedStreamRelay.)"""
        ...

    def error_body(self, err: GatewayError) -> bytes:
        """A refusal in this API's error shape."""
        ...


class Stateless:
    """The WireFormat members of an API whose requests have its backends store nothing for
    later calls (OpenAI's chat completions, Anthropic's Messages). Its requests may still name
    files by id: each must be the team's (an Anthropic file, whose API the gateway does not
    pass, never is)."""

    def stored_references(self, body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple(file_references(body))

    def unstored(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def stored_object(self, raw: bytes) -> str | None:
        return None


# -- what several formats read alike --------------------------------------------------------------


def file_references(body: Any) -> list[tuple[str, str]]:
    """Every file the request names by id, wherever it does (a chat file part, a Responses
    `input_file` or `input_image`, a code interpreter's `file_ids`, a prompt variable, ...):
    each `file_id` string and `file_ids` list of strings in the whole body, so that no place an
    API adds one escapes the owner check."""
    out: list[tuple[str, str]] = []
    pending = [body]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "file_id" and isinstance(value, str):
                    out.append((FILE_OBJECT, value))
                elif key == "file_ids" and isinstance(value, list):
                    out += [(FILE_OBJECT, v) for v in value if isinstance(v, str)]
                elif isinstance(value, dict | list):
                    pending.append(value)
        elif isinstance(node, list):
            pending.extend(v for v in node if isinstance(v, dict | list))
    return out


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; the 400 every format answers otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc.args[0]})", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", "invalid_json")
    return body


def post_route(
    endpoints: Mapping[str, Endpoint], method: str, path: str
) -> tuple[Endpoint, str | None] | None:
    """WireFormat.route for an API whose endpoints all take POST."""
    endpoint = endpoints.get(path)
    if endpoint is None:
        return None
    if method != "POST":
        raise method_not_allowed(method, path, ("POST",))
    return endpoint, None


# The calls on a stored object, by what follows its id in the path ("" for the object itself),
# each with the methods it takes.
StoredCalls = Mapping[str, tuple[Endpoint, tuple[str, ...]]]


def stored_route(
    prefix: str, calls: StoredCalls, method: str, path: str
) -> tuple[Endpoint, str] | None:
    """The call and the object's id of a path under `prefix` (".../{id}[/call]"); None when it
    names no call; raises 405 for a method the call does not take."""
    if not path.startswith(prefix):
        return None
    object_id, _, rest = path[len(prefix) :].partition("/")
    found = calls.get(f"/{rest}" if rest else "")
    if found is None or not object_id:
        return None
    endpoint, methods = found
    if method not in methods:
        raise method_not_allowed(method, path, methods)
    return endpoint, object_id


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed for {path}",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("allow", ", ".join(allowed)),),
    )
