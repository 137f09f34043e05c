"""External guards: safety models, a moderation API and webhooks, over HTTP.

Four formats, all called with one shared aiohttp session per sidecar process (`GuardClient`):

- ``llama_guard``: Meta Llama Guard 3 behind an OpenAI-compatible server (vLLM, Ollama, NIM...).
  In ``chat`` mode the turns go to ``{url}/chat/completions`` and the server's own chat template
  (the model's ``tokenizer_config.json``) builds the Llama Guard prompt; in ``completion`` mode
  we build that prompt ourselves (`llama_guard_prompt`) and post it to ``{url}/completions``.
  The reply is ``safe``, or ``unsafe`` and a line of category codes such as ``S1,S10``.
- ``nemoguard``: NVIDIA Llama 3.1 NemoGuard 8B ContentSafety (Aegis 2.0 taxonomy). Its prompt
  (`nemoguard_prompt`) goes to ``{url}/chat/completions`` as one user message; the reply is a
  JSON object: ``{"User Safety": "unsafe", "Response Safety": "safe", "Safety Categories":
  "Violence, Threat"}``.
- ``openai_moderation``: ``POST {url}/moderations`` with ``{"model": ..., "input": [texts]}``;
  flagged when any result is, categories are the names whose flag is true.
- ``webhook``: your own policy service, with this contract:

  Request: ``POST <url>`` (with ``Authorization: Bearer <api_key>`` when one is configured) and
  the JSON body ``{"stage": "request" | "response", "team": "<team>", "model": "<model>",
  "texts": ["...", ...]}``, where ``texts`` are the prompt's texts (request stage) or the
  answer's texts (response stage), in order.

  Reply: status 2xx and the JSON body ``{"action": "allow" | "block" | "rewrite", "reason":
  "...", "categories": ["...", ...], "texts": ["...", ...]}``. ``reason`` (optional) and
  ``categories`` (optional) are written to logs and the audit trail, so they must not quote the
  texts. ``texts`` is required for ``rewrite`` only: the replacement texts, exactly as many as
  were sent, in the same order.

Whatever goes wrong (a timeout, a refused connection, a non-2xx status, a reply we cannot read)
raises `GuardUnavailable` with a short reason that names what failed, never the judged text or
the API key, and the guard's ``on_error`` policy decides. Each call is bounded as a whole by the
endpoint's timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import aiohttp
import orjson

from .types import Action, GuardUnavailable, SafetyReply

__all__ = [
    "LLAMA_GUARD_CATEGORIES",
    "NEMOGUARD_CATEGORIES",
    "Format",
    "GuardClient",
    "GuardEndpoint",
    "llama_guard_prompt",
    "nemoguard_prompt",
    "parse_llama_guard",
    "parse_moderation",
    "parse_nemoguard",
    "parse_webhook",
]

Format = Literal["llama_guard", "nemoguard", "openai_moderation", "webhook"]
Judge = Literal["user", "agent"]
Conversation = list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class GuardEndpoint:
    url: str  # ".../v1" for the three model formats; the full URL for a webhook
    model: str | None  # the safety model's name (not used by webhooks)
    api_key: str | None = field(repr=False)  # kept out of repr so logging an endpoint is safe
    timeout_s: float


# --------------------------------------------------------------------------- Llama Guard 3

# The hazard taxonomy exactly as Llama Guard 3 8B's own chat template lists it (the model card's
# table uses longer titles, but these short ones are what the model was prompted with).
LLAMA_GUARD_CATEGORIES: Mapping[str, str] = MappingProxyType(
    {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex Crimes",
        "S4": "Child Exploitation",
        "S5": "Defamation",
        "S6": "Specialized Advice",
        "S7": "Privacy",
        "S8": "Intellectual Property",
        "S9": "Indiscriminate Weapons",
        "S10": "Hate",
        "S11": "Self-Harm",
        "S12": "Sexual Content",
        "S13": "Elections",
        "S14": "Code Interpreter Abuse",
    }
)

# No <|begin_of_text|>: OpenAI-compatible servers add BOS to a /v1/completions prompt themselves
# (vLLM's add_special_tokens defaults to true there), and a second one degrades the verdicts.
# Everything else, including "according our" and the blank lines, is what the model's chat
# template renders, so both modes show the model the same text.
_LG_HEAD = (
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our "
    "safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n"
)
_LG_TAIL = (
    "<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
)
_LG_ROLE = {"user": "User", "assistant": "Agent"}
# A verdict with several categories is ~3 tokens per category; 20 tokens would cut a long list
# mid-code ("S1" for "S10"). The model stops at end-of-turn, so a higher cap costs nothing.
_LLAMA_GUARD_MAX_TOKENS = 32
_LG_VERDICT = re.compile(r"\s*(safe|unsafe)\b(.*)", re.IGNORECASE | re.DOTALL)
_LG_CODE = re.compile(r"[A-Za-z]{1,3}\d{1,3}")

# Llama 3 control tokens (<|eot_id|>, <|start_header_id|>, ...). Servers tokenize these as
# special tokens even inside message text, which would let the judged text close its own turn
# and write the verdict; spelled without the bars they are plain text.
_CONTROL_TOKEN = re.compile(r"<\|([A-Za-z0-9_]{1,40})\|>")


class _NothingToJudge(ValueError):
    pass


def _defang(text: str) -> str:
    return _CONTROL_TOKEN.sub(r"<\1>", text) if "<|" in text else text


def _turns(conversation: Conversation) -> list[list[str]]:
    """[role, text] pairs with roles "user"/"assistant", consecutive same-role texts joined.

    System text counts as the user's: a gateway's caller writes the system prompt as well as the
    user turns, so it is judged with them instead of being dropped.
    """
    turns: list[list[str]] = []
    for message in conversation:
        role = "assistant" if message.get("role") == "assistant" else "user"
        text = _defang(message.get("content") or "")
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    return turns


def _llama_guard_turns(conversation: Conversation, judge: Judge) -> list[list[str]]:
    """The turns Llama Guard sees: alternating, starting with the user, ending with the judged
    role. Judging the user, the answer must not be present (model card); judging the agent,
    later user turns have nothing to do with it."""
    wanted = "user" if judge == "user" else "assistant"
    turns = _turns(conversation)
    while turns and turns[-1][0] != wanted:
        turns.pop()
    if not turns:
        raise _NothingToJudge(f"no {judge} turn to judge")
    if turns[0][0] == "assistant":
        turns.insert(0, ["user", ""])  # the template insists on user first
    return turns


def _category_lines(categories: Mapping[str, str]) -> str:
    return "\n".join(
        f"{code}: {name}" if name.endswith(".") else f"{code}: {name}."
        for code, name in categories.items()
    )


def llama_guard_prompt(
    conversation: Conversation, judge: Judge, categories: Mapping[str, str] | None = None
) -> str:
    """The full Llama Guard 3 prompt for ``/v1/completions``, judging the last user turn
    (``judge="user"``) or the last assistant turn (``"agent"``) with the turns before it as
    context. ``categories`` maps codes to names (default: S1..S14). ValueError when the
    conversation has no turn of the judged role."""
    turns = _llama_guard_turns(conversation, judge)
    role = _LG_ROLE[turns[-1][0]]
    body = "".join(f"{_LG_ROLE[r]}: {text.strip()}\n\n" for r, text in turns)
    head = _LG_HEAD.format(
        role=role, categories=_category_lines(categories or LLAMA_GUARD_CATEGORIES)
    )
    return head + body + _LG_TAIL.format(role=role)


def parse_llama_guard(text: str) -> SafetyReply:
    """``safe``, or ``unsafe`` and optionally its category codes (``S1,S10``), in any case and
    with any whitespace around; ValueError on anything else."""
    match = _LG_VERDICT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("not a Llama Guard verdict")
    verdict, rest = match.group(1).lower(), match.group(2)
    codes = [c for c in re.split(r"[\s,]+", rest) if c]
    if verdict == "safe":
        if codes:
            raise ValueError("text after a 'safe' verdict")
        return SafetyReply(True)
    if not all(_LG_CODE.fullmatch(c) for c in codes):
        raise ValueError("unreadable category list")
    return SafetyReply(False, tuple(dict.fromkeys(c.upper() for c in codes)))


# --------------------------------------------------------------------------- NemoGuard

# Aegis 2.0 / Nemotron Content Safety taxonomy, as NVIDIA's prompt lists it. The model answers
# with these names, not with the codes.
NEMOGUARD_CATEGORIES: Mapping[str, str] = MappingProxyType(
    {
        "S1": "Violence",
        "S2": "Sexual",
        "S3": "Criminal Planning/Confessions",
        "S4": "Guns and Illegal Weapons",
        "S5": "Controlled/Regulated Substances",
        "S6": "Suicide and Self Harm",
        "S7": "Sexual (minor)",
        "S8": "Hate/Identity Hate",
        "S9": "PII/Privacy",
        "S10": "Harassment",
        "S11": "Threat",
        "S12": "Profanity",
        "S13": "Needs Caution",
        "S14": "Other",
        "S15": "Manipulation",
        "S16": "Fraud/Deception",
        "S17": "Malware",
        "S18": "High Risk Gov Decision Making",
        "S19": "Political/Misinformation/Conspiracy",
        "S20": "Copyright/Trademark/Plagiarism",
        "S21": "Unauthorized Advice",
        "S22": "Illegal Activity",
        "S23": "Immoral/Unethical",
    }
)

_NG_HEAD = (
    "Task: Check if there is unsafe content in the user or agent messages in the below "
    "conversation in accordance with our safety policy with the below categories. Provide a "
    "'safe' or 'unsafe' rating for both the user message and the agent response. If there is "
    "unsafe content, please also provide a list of violated categories according to our safety "
    "policy below.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    + _category_lines(NEMOGUARD_CATEGORIES)
    + "\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n"
)
_NG_TAIL = (
    "<END CONVERSATION>\n\n"
    "Provide your safety assessment for the above conversation in the below output JSON format:\n"
    '{"User Safety": safe or unsafe rating for the user message, "Response Safety": safe or '
    "unsafe rating for the agent response. Omit if no agent response present. "
    '"Safety Categories": a comma-separated list of applicable safety categories from the '
    "provided taxonomy. Omit if all safe.}\n\n"
    "Do not include anything other than the output JSON in your response.\n"
    "Output JSON: "
)
_NEMOGUARD_MAX_TOKENS = 100  # NVIDIA's integration uses 50; a long category list needs more


def _user_text(conversation: Conversation) -> str:
    # The prompt has one user slot: every user-side turn goes in, so a request cannot hide
    # content in an earlier (possibly fabricated) turn of its history.
    return "\n\n".join(text for role, text in _turns(conversation) if role == "user")


def nemoguard_prompt(conversation: Conversation, response: str | None = None) -> str:
    """The NemoGuard content-safety prompt: the conversation's user-side text in the user slot
    and, when given, ``response`` as the agent's answer (without one the model rates only the
    user)."""
    block = f"user: {_user_text(conversation)}\n\n"
    if response is not None:
        block += f"response: agent: {_defang(response)}\n\n"
    return _NG_HEAD + block + _NG_TAIL


def _normal_key(key: str) -> str:
    return " ".join(key.replace("_", " ").split()).lower()


def _json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: models wrap it in code fences or chat around it."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ValueError("no JSON object in the reply")


def _category_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise ValueError("'Safety Categories' is neither a string nor a list of strings")
    return tuple(dict.fromkeys(s for s in (i.strip() for i in items) if s))


def parse_nemoguard(text: str, judge: Judge) -> SafetyReply:
    """The rating of the user (``"User Safety"``) or of the answer (``"Response Safety"``) from
    NemoGuard's JSON reply; the categories come along only when that rating is unsafe (the
    model lists one set for both). ValueError when the rating is missing or not safe/unsafe."""
    if not isinstance(text, str):
        raise ValueError("not a NemoGuard reply")
    found = {_normal_key(k): v for k, v in _json_object(text).items() if isinstance(k, str)}
    key = "user safety" if judge == "user" else "response safety"
    rating = found.get(key)
    if not isinstance(rating, str) or rating.strip().lower() not in ("safe", "unsafe"):
        raise ValueError(f"no safe/unsafe {key!r} in the reply")
    if rating.strip().lower() == "safe":
        return SafetyReply(True)
    return SafetyReply(False, _category_list(found.get("safety categories")))


# --------------------------------------------------------------------------- moderation


def parse_moderation(body: Any) -> SafetyReply:
    """An OpenAI moderation response: unsafe when any result is flagged; the categories are the
    names flagged true in any result, sorted."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not results:
        raise ValueError("no 'results' in the moderation reply")
    flagged = False
    names: set[str] = set()
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("flagged"), bool):
            raise ValueError("a moderation result without a boolean 'flagged'")
        categories = result.get("categories", {})
        if not isinstance(categories, dict):
            raise ValueError("a moderation result whose 'categories' is not an object")
        flagged = flagged or result["flagged"]
        names.update(name for name, on in categories.items() if on is True)
    return SafetyReply(not flagged, tuple(sorted(names)) if flagged else ())


# --------------------------------------------------------------------------- webhook

_MAX_REASON = 200  # a reason is a log field: a webhook echoing a whole text must not flood logs


def parse_webhook(
    body: Any, n_texts: int
) -> tuple[Action, str, tuple[str, ...], tuple[str, ...] | None]:
    """(action, reason, categories, texts): ``texts`` for a rewrite (``n_texts`` of them),
    otherwise None. ValueError on a reply that breaks the contract."""
    if not isinstance(body, dict):
        raise ValueError("the webhook reply is not a JSON object")
    action = body.get("action")
    if action not in ("allow", "block", "rewrite"):
        raise ValueError("'action' is not allow, block or rewrite")
    reason = body.get("reason")
    if reason is None:
        reason = ""
    elif not isinstance(reason, str):
        raise ValueError("'reason' is not a string")
    categories = body.get("categories")
    if categories is None:
        categories = []
    elif not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ValueError("'categories' is not a list of strings")
    texts: tuple[str, ...] | None = None
    if action == "rewrite":
        raw = body.get("texts")
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise ValueError("a rewrite without a list of strings in 'texts'")
        if len(raw) != n_texts:
            raise ValueError(f"a rewrite with {len(raw)} texts for {n_texts}")
        texts = tuple(raw)
    return action, reason[:_MAX_REASON], tuple(categories), texts


# --------------------------------------------------------------------------- the client

# Safety verdicts are a few bytes; a webhook's rewrite may return texts as long as the prompt.
_MAX_MODEL_REPLY = 1 << 20
_MAX_WEBHOOK_REPLY = 64 << 20
_CONNECTIONS = 256  # aiohttp's default 100 would queue guard calls behind each other under load


def _chat_content(body: Any) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not a string")
    return content


def _completion_text(body: Any) -> str:
    try:
        text = body["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].text") from None
    if not isinstance(text, str):
        raise ValueError("choices[0].text is not a string")
    return text


class GuardClient:
    """One aiohttp ClientSession for all guard calls of a sidecar process (created lazily
    inside the running loop; close() on shutdown). Use one client per event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Each call's deadline is asyncio.timeout in _post; redirects are refused so the
            # bearer token never follows one to another host.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _post(self, ep: GuardEndpoint, url: str, payload: Any, limit: int) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        data = orjson.dumps(payload)
        session = self._client()
        # Every raise below is "from None": a chained aiohttp error would carry the URL (which
        # may hold credentials) into tracebacks.
        try:
            async with asyncio.timeout(ep.timeout_s):
                async with session.post(
                    url, data=data, headers=headers, allow_redirects=False
                ) as response:
                    if not 200 <= response.status < 300:
                        raise GuardUnavailable(f"HTTP {response.status}")
                    raw = await _read_capped(response, limit)
        except TimeoutError:
            raise GuardUnavailable(f"timeout after {ep.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise GuardUnavailable(f"connection error ({type(exc).__name__})") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GuardUnavailable("unparseable reply") from None

    async def llama_guard(
        self,
        ep: GuardEndpoint,
        conversation: Conversation,
        judge: Judge,
        *,
        mode: Literal["chat", "completion"] = "chat",
    ) -> SafetyReply:
        """Llama Guard 3's verdict on the last user or assistant turn. A conversation without a
        turn of the judged role has nothing to judge and is safe, without a call."""
        try:
            turns = _llama_guard_turns(conversation, judge)
        except _NothingToJudge:
            return SafetyReply(True)
        base = ep.url.rstrip("/")
        payload: dict[str, Any] = {
            "model": ep.model,
            "temperature": 0,
            "max_tokens": _LLAMA_GUARD_MAX_TOKENS,
        }
        if mode == "chat":
            payload["messages"] = [{"role": r, "content": t} for r, t in turns]
            body = await self._post(ep, f"{base}/chat/completions", payload, _MAX_MODEL_REPLY)
        else:
            payload["prompt"] = llama_guard_prompt(conversation, judge)
            body = await self._post(ep, f"{base}/completions", payload, _MAX_MODEL_REPLY)
        try:
            text = _chat_content(body) if mode == "chat" else _completion_text(body)
            return parse_llama_guard(text)
        except ValueError:
            raise GuardUnavailable("unparseable reply") from None

    async def nemoguard(
        self,
        ep: GuardEndpoint,
        conversation: Conversation,
        response: str | None,
        judge: Judge,
    ) -> SafetyReply:
        """NemoGuard's rating of the user (``judge="user"``) or of ``response`` (``"agent"``;
        without ``response``, the conversation's trailing assistant turn is the answer)."""
        if judge == "agent" and response is None:
            turns = _turns(conversation)
            if not turns or turns[-1][0] != "assistant":
                return SafetyReply(True)
            response = turns[-1][1]
            conversation = [{"role": r, "content": t} for r, t in turns[:-1]]
        elif judge == "user" and not any(r == "user" for r, _ in _turns(conversation)):
            return SafetyReply(True)
        payload = {
            "model": ep.model,
            "messages": [{"role": "user", "content": nemoguard_prompt(conversation, response)}],
            "temperature": 0,
            "max_tokens": _NEMOGUARD_MAX_TOKENS,
        }
        url = f"{ep.url.rstrip('/')}/chat/completions"
        body = await self._post(ep, url, payload, _MAX_MODEL_REPLY)
        try:
            return parse_nemoguard(_chat_content(body), judge)
        except ValueError:
            raise GuardUnavailable("unparseable reply") from None

    async def moderation(self, ep: GuardEndpoint, texts: list[str]) -> SafetyReply:
        """The moderation API's verdict on all ``texts`` at once (no texts: safe, no call)."""
        if not texts:
            return SafetyReply(True)
        payload = {"model": ep.model, "input": list(texts)}
        body = await self._post(ep, f"{ep.url.rstrip('/')}/moderations", payload, _MAX_MODEL_REPLY)
        try:
            return parse_moderation(body)
        except ValueError:
            raise GuardUnavailable("unparseable reply") from None

    async def webhook(
        self, ep: GuardEndpoint, payload: dict[str, Any]
    ) -> tuple[Action, str, tuple[str, ...], tuple[str, ...] | None]:
        """Posts ``payload`` (see the module docstring) to the webhook's own URL."""
        body = await self._post(ep, ep.url, payload, _MAX_WEBHOOK_REPLY)
        texts = payload.get("texts")
        try:
            return parse_webhook(body, len(texts) if isinstance(texts, list) else 0)
        except ValueError as exc:
            # parse_webhook's messages name fields and counts, never the texts.
            raise GuardUnavailable(f"malformed reply: {exc}") from None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise GuardUnavailable("reply too large")
    buffer = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        buffer += chunk
        if len(buffer) > limit:
            raise GuardUnavailable("reply too large")
    return bytes(buffer)
