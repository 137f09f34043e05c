"""The one YAML configuration file: schema, validation with field paths, secret resolution.

Two layers on purpose: `Config` is what the file says (enough to render Envoy's bootstrap,
which never needs a secret), and `Runtime` is what the sidecar serves with (secrets resolved
from the environment or files, lookup tables built). `extproc check` builds both.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .keys.records import KEY_ID_PREFIX as RUN_TIME_KEY_PREFIX
from .keys.settings import KeysSettings

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$"
# A user as the identity provider or the key's owner names them (a subject, an e-mail address):
# any printable text; "|" separates the parts of a counter's name (quota/budgets.py).
# What Identity.key starts with for a token's caller and a run-time key: no config key's name
# may, so a config key's limits apply to its own callers only (quota/budgets.py).
TOKEN_LABEL_PREFIX = "jwt:"


def user_problem(user: str) -> str | None:
    """Why `user` cannot name a user (None: it can). The one rule for a user id, whether the
    config, a run-time key or a token's claim names it: it reaches logs, audit records, 429
    messages and metric labels, so no control or format character (a line break, a right-to-left
    override) that would make a line say something else; counters hash it (quota/budgets.py)."""
    if not 1 <= len(user) <= 256:
        return "1 to 256 characters"
    if not user.isprintable():
        return "printable characters only (no control or format characters)"
    return None


def _user_id(user: str) -> str:
    problem = user_problem(user)
    if problem is not None:
        raise ValueError(f"a user id: {problem}")
    return user


UserId = Annotated[str, AfterValidator(_user_id)]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(Exception):
    """Every problem found in a config file, each with the path of the field it concerns."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} error(s)"]
        lines += [f"  {path or '<root>'}: {message}" for path, message in self.problems]
        return "\n".join(lines)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    """Where a secret lives. Never the secret itself: YAML files end up in repositories."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def resolve(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise LookupError(f"environment variable {self.env} is not set")
        else:
            assert self.file is not None
            try:
                value = self.file.read_text(encoding="utf-8")
            except OSError as exc:
                raise LookupError(f"cannot read {self.file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise LookupError(f"{self.file} is not UTF-8 text") from None
        value = value.strip()
        if not value:
            raise LookupError("the secret is empty")
        return value


Window = Literal["minute", "hour", "day", "month"]
METRICS = ("tokens", "input_tokens", "output_tokens", "requests", "usd")


class Limit(_Strict):
    """One budget of a team: exactly one metric, over one calendar window (UTC)."""

    name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    window: Window
    tokens: int | None = Field(default=None, ge=1)
    input_tokens: int | None = Field(default=None, ge=1)
    output_tokens: int | None = Field(default=None, ge=1)
    requests: int | None = Field(default=None, ge=1)
    usd: float | None = Field(default=None, gt=0)
    # None: every model the team uses. Names of models or of model_groups.
    models: list[str] | None = None

    @model_validator(mode="after")
    def _one_metric(self) -> Limit:
        given = [m for m in METRICS if getattr(self, m) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(METRICS)}")
        return self

    @property
    def metric(self) -> str:
        return next(m for m in METRICS if getattr(self, m) is not None)


class ApiKey(_Strict):
    """A client API key: a sha256 hex digest in the file, or the key itself from env/file."""

    sha256: str | None = None
    env: str | None = None
    file: Path | None = None
    name: str | None = Field(default=None, description="a label for logs; never the key")
    # Whose key it is below the team: its requests count against the user's limits too.
    user: UserId | None = None
    # None: the team's models. A list narrows them (model or model_groups names).
    models: list[str] | None = None
    # The key's own budgets, on top of its user's, team's and organization's.
    limits: list[Limit] = []

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v.lower()):
            raise ValueError("must be 64 hexadecimal characters (sha256 of the key)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKey:
        given = [k for k in ("sha256", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'sha256', 'env' or 'file'")
        return self


GuardType = Literal[
    "pii", "deny", "max_prompt_tokens", "llama_guard", "nemoguard", "openai_moderation", "webhook"
]
EXTERNAL_GUARDS = ("llama_guard", "nemoguard", "openai_moderation", "webhook")
_GUARD_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Guard(_Strict):
    """One guard. Local ones (pii, deny, max_prompt_tokens) run in the sidecar; external ones
    call a safety model, a moderation API or a webhook."""

    type: GuardType
    # pii: which entities, and whether to mask them or block the request/response.
    entities: list[str] | None = None
    action: Literal["mask", "block"] = "mask"
    # deny: regular expressions and keywords (whole words, any case).
    patterns: list[str] = []
    keywords: list[str] = []
    # max_prompt_tokens
    max_tokens: int | None = Field(default=None, ge=1)
    # external guards
    url: str | None = Field(default=None, description="base URL (…/v1), or the webhook's URL")
    model: str | None = None
    api_key: SecretRef | None = None
    mode: Literal["chat", "completion"] = "chat"  # llama_guard: who builds the prompt
    categories: list[str] | None = Field(
        default=None, description="block only on these categories (default: on any unsafe)"
    )
    timeout_ms: int = Field(default=1000, ge=1, le=60_000)
    on_error: Literal["block", "allow"] = "block"  # fail closed (default) or open

    @model_validator(mode="after")
    def _fields_for_type(self) -> Guard:
        t = self.type
        if t == "deny" and not (self.patterns or self.keywords):
            raise ValueError("a deny guard needs 'patterns' or 'keywords'")
        if t == "max_prompt_tokens" and self.max_tokens is None:
            raise ValueError("a max_prompt_tokens guard needs 'max_tokens'")
        if t in EXTERNAL_GUARDS:
            if not self.url:
                raise ValueError(f"a {t} guard needs 'url'")
            if t != "webhook" and not self.model:
                raise ValueError(f"a {t} guard needs 'model'")
        if t == "deny":
            from .guard.detectors import DenyList

            DenyList(self.patterns, self.keywords)  # a bad regex is a config error, named
        if t == "pii" and self.entities is not None and not self.entities:
            raise ValueError("'entities' is empty: leave it out to find every kind")
        if t == "pii" and self.entities is not None:
            from .guard.detectors import known_kinds

            unknown = [e for e in self.entities if e not in known_kinds()]
            if unknown:
                raise ValueError(f"unknown entities {unknown}; known: {list(known_kinds())}")
        return self


class GuardLists(_Strict):
    """Guards by stage, each list applied in order."""

    request: list[str] | None = None
    response: list[str] | None = None


class GuardrailSettings(_Strict):
    # The defaults for every team; a team's own lists replace them, a model's are added.
    request: list[str] = []
    response: list[str] = []
    block_status: int = Field(default=403, ge=400, le=599)


class User(_Strict):
    # This user's budgets in the team, instead of the team's user_limits.
    limits: list[Limit] = []


class Team(_Strict):
    # A team's callers: its API keys, and the JWTs that identities.jwt maps to it (either).
    keys: list[ApiKey] = []
    # The organization the team belongs to (one): its budgets cover all its teams.
    organization: str | None = None
    # None: every configured model (or the organization's). A list restricts the team to those.
    models: list[str] | None = None
    limits: list[Limit] = []
    # Budgets of each user of the team (a token's user claim, a key's `user`), each on its own.
    user_limits: list[Limit] = []
    users: dict[UserId, User] = {}
    guardrails: GuardLists = GuardLists()


class Organization(_Strict):
    # Budgets shared by every team of the organization.
    limits: list[Limit] = []
    # None: every configured model. A list restricts all its teams to those.
    models: list[str] | None = None


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    # Input read from the provider's prompt cache (OpenAI's cached_tokens, Anthropic's cache
    # reads) and input written to it (Anthropic's cache writes); unset: the input price.
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    # Output the model spent reasoning (OpenAI's reasoning_tokens, Gemini's thoughts), where a
    # provider prices it apart; unset: the output price.
    reasoning: float | None = Field(default=None, ge=0)

    def micro_usd(
        self,
        input_tokens: int,
        output_tokens: int,
        cached: int = 0,
        written: int = 0,
        reasoning: int = 0,
    ) -> float:
        """The cost in micro-USD (USD per million x tokens): the one pricing rule, for the
        metrics, the audit record and USD budgets alike. `input_tokens` includes the cached
        and written ones, as providers' prompt counts do; `output_tokens` the reasoning."""
        cached = min(cached, input_tokens)
        written = min(written, input_tokens - cached)
        plain = input_tokens - cached - written
        reasoning = min(reasoning, output_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write is None else self.cache_write
        reasoning_price = self.output if self.reasoning is None else self.reasoning
        return (
            plain * self.input
            + cached * cached_price
            + written * write_price
            + (output_tokens - reasoning) * self.output
            + reasoning * reasoning_price
        )


class RedisSettings(_Strict):
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretRef | None = None
    cluster: bool = False
    # Each command's answer; a slower one counts as "store unavailable".
    timeout_ms: int = Field(default=50, ge=1, le=10_000)
    # What a call may spend first getting a connection: waiting for a free one of the pool,
    # and (re)opening it after a failure. Not charged to timeout_ms.
    connect_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    # Connections per sidecar process, opened at start-up; also the most calls in flight
    # (more wait for a free connection, within connect_timeout_ms).
    pool_size: int = Field(default=16, ge=1, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _max_connections(cls, data: Any) -> Any:
        # The name this setting had before it opened its connections ahead: still taken.
        if isinstance(data, dict) and "max_connections" in data:
            if "pool_size" in data:
                raise ValueError("max_connections is the old name of pool_size: set one")
            data = {**data, "pool_size": data["max_connections"]}
            del data["max_connections"]
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("must be a redis:// or rediss:// URL with a host")
        if parts.password:
            raise ValueError("must not hold a password: use 'password: {env: ...}'")
        return v


class QuotaSettings(_Strict):
    store: Literal["memory", "redis"] = "memory"
    redis: RedisSettings = RedisSettings()
    # When the store is slow or down: refuse with 503 (closed) or admit unmetered (open).
    failure_mode: Literal["closed", "open"] = "closed"
    # An unsettled reservation (a sidecar that died mid-request) is charged after this long.
    reservation_ttl_s: float = Field(default=900.0, ge=1)
    # Output reserved for a request that does not say max_tokens / max_completion_tokens.
    default_max_tokens: int = Field(default=4096, ge=1)


class AdminSettings(_Strict):
    # When set, admin calls must carry "authorization: Bearer <token>" gRPC metadata.
    token: SecretRef | None = None


def url_port(url: str) -> int:
    """An http(s) URL's port, or its scheme's."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


ProviderType = Literal["openai", "azure", "anthropic", "bedrock", "gemini"]

# bedrock-runtime.<region>.amazonaws.com (and its FIPS and dual-stack spellings)
_BEDROCK_HOST = re.compile(
    r"^bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.(?:api\.aws|amazonaws\.com)$"
)


# The credential header of a provider's API, where it is not "Authorization: Bearer".
# Azure OpenAI's latest generally available data-plane API version when this was written: the
# api-version of an azure backend's requests unless it says another.
AZURE_API_VERSION = "2024-10-21"
# The types whose requests and answers the gateway translates (providers/).
TRANSLATED_TYPES = frozenset({"anthropic", "bedrock", "gemini"})
# Who can take a token from which identity: Azure OpenAI (its deployments, or its v1 API as an
# openai backend), Vertex AI (Gemini, or its OpenAI-compatible endpoint).
_TOKEN_TYPES = {"azure_identity": {"azure", "openai"}, "google_adc": {"gemini", "openai"}}
_AUTH_HEADERS = {"anthropic": "x-api-key", "azure": "api-key", "gemini": "x-goog-api-key"}


class Backend(_Strict):
    url: str = Field(description="OpenAI-style base URL, e.g. https://api.openai.com/v1")
    # The API the backend speaks: OpenAI's (and compatible servers'), or one the gateway
    # translates the OpenAI clients' requests into (extproc/providers/).
    type: ProviderType = "openai"
    api_key: SecretRef | None = None
    # Most providers take "Authorization: Bearer <key>"; Azure-style ones take "api-key: <key>";
    # Anthropic takes "x-api-key: <key>" (its default there).
    auth_header: str = "authorization"
    # Anthropic and Bedrock require max_tokens: what a request that sets none asks for.
    max_tokens: int = Field(default=4096, ge=1)
    # Instead of an api_key: a bearer token from an identity, refreshed by the sidecar
    # (backend_tokens.py): `azure_identity` (Entra ID, azure-identity's default credential
    # chain; Azure OpenAI) or `google_adc` (Google's application default credentials; Vertex).
    token_from: Literal["azure_identity", "google_adc"] | None = None
    # Azure OpenAI's deployment API: the api-version every request names.
    api_version: str = Field(default=AZURE_API_VERSION, pattern=r"^\d{4}-\d{2}-\d{2}(-preview)?$")
    # Bedrock: the AWS region its requests are signed for (SigV4, by Envoy, with the standard
    # AWS credential chain of Envoy's environment); by default the one the URL's host names.
    # A Bedrock backend with an `api_key` (a Bedrock API key) is not signed.
    aws_region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    # An OpenAI backend that serves OpenAI's Responses API (/v1/responses) itself gets those
    # requests as they are; any other gets them as chat completions (wire/responses/). Unset:
    # only OpenAI's own API (api.openai.com) is taken to serve it; most self-hosted servers do
    # not, or not all of it.
    responses_api: bool | None = None
    # An OpenAI backend that stores files and runs batches (OpenAI's Files and Batch APIs):
    # a team's batch files and batches go to it through the models it serves alone
    # (batches.py). Off unless asked for: a batch spends a day's tokens where the gateway
    # cannot see them, and its backend's models leave the native path (a file by id is checked).
    batches: bool = False
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=600.0, ge=0, description="whole request; 0 = none")
    # Envoy's circuit breaker: requests in flight to this backend (Envoy's default is 1024).
    max_requests: int = Field(default=10_000, ge=1, le=1_000_000)
    # Passive health (Envoy outlier detection): after this many consecutive 5xx or connect
    # failures the backend is skipped for eject_for_s (longer each time), then tried again.
    eject_after_failures: int = Field(default=5, ge=1, le=1000)
    eject_for_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v

    @field_validator("api_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # YAML reads an unquoted 2024-10-21 as a date.
        return v.isoformat() if isinstance(v, datetime.date) else v

    @field_validator("auth_header")
    @classmethod
    def _header(cls, v: str) -> str:
        v = v.lower()
        if not re.match(r"^[a-z0-9-]+$", v):
            raise ValueError("must be an HTTP header name")
        return v

    @model_validator(mode="after")
    def _provider_header(self) -> Backend:
        if self.token_from is not None:
            if self.api_key is not None:
                raise ValueError("a backend takes an api_key or a token_from, not both")
            if self.type not in _TOKEN_TYPES[self.token_from]:
                raise ValueError(
                    f"token_from {self.token_from} is for a backend of type "
                    f"{' or '.join(sorted(_TOKEN_TYPES[self.token_from]))}"
                )
            if "auth_header" in self.model_fields_set and self.auth_header != "authorization":
                raise ValueError("a token from token_from goes in auth_header: authorization")
        elif "auth_header" not in self.model_fields_set and self.type in _AUTH_HEADERS:
            object.__setattr__(self, "auth_header", _AUTH_HEADERS[self.type])
        if self.responses_api is not None and self.type != "openai":
            raise ValueError("responses_api is for an openai backend")
        if self.batches and self.type != "openai":
            raise ValueError("batches is for an openai backend")
        if "api_version" in self.model_fields_set and self.type != "azure":
            raise ValueError("api_version is for an azure backend")
        if self.aws_region is not None and self.type != "bedrock":
            raise ValueError("aws_region is for a bedrock backend")
        if self.type == "bedrock" and self.api_key is None and self.signing_region is None:
            raise ValueError(
                "a bedrock backend signed with AWS credentials needs aws_region (its URL's "
                f"host {self.host!r} names none)"
            )
        return self

    @property
    def apis(self) -> frozenset[str]:
        """The client APIs (wire formats, extproc/wire/) it serves as the client speaks them:
        a request in any other is translated for it."""
        if self.type == "anthropic":
            return frozenset({"anthropic"})
        if self.type == "azure":
            return frozenset({"openai"})
        if self.type != "openai":
            return frozenset()
        responses = self.responses_api
        if responses is None:
            responses = self.host == "api.openai.com"
        return frozenset({"openai", "responses"} if responses else {"openai"})

    @property
    def runs_batches(self) -> bool:
        """It stores files and runs batches (OpenAI's Files and Batch APIs)."""
        return self.batches and self.type == "openai"

    @property
    def signing_region(self) -> str | None:
        """The AWS region a Bedrock backend's requests are signed for; None: not signed."""
        if self.type != "bedrock" or self.api_key is not None:
            return None
        if self.aws_region is not None:
            return self.aws_region
        named = _BEDROCK_HOST.match(self.host)
        return named.group(1) if named else None

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return url_port(self.url)

    @property
    def base_path(self) -> str:
        """The path that replaces the client's `/v1` (no trailing slash)."""
        return urlsplit(self.url).path.rstrip("/") or "/v1"


class Target(_Strict):
    backend: str
    model: str | None = Field(default=None, description="the provider's model name")
    weight: int = Field(default=1, ge=0, le=10_000)
    # Pools: targets of priority 0 serve; a request that fails there (429, 5xx, connect
    # failure, reset) is retried on priority 1 within the same request, and so on.
    priority: int = Field(default=0, ge=0, le=9)


# What a model serves: chat (and completions, and the Anthropic and Responses APIs), completions,
# embeddings, or one of OpenAI's endpoints passed to the backend as they are (images, audio,
# moderations, rerank).
ModelType = Literal["chat", "completion", "embedding", "image", "audio", "moderation", "rerank"]


class Model(_Strict):
    type: ModelType = "chat"
    encoding: str | None = Field(default=None, description="tiktoken encoding override")
    owned_by: str = "extproc"
    targets: Annotated[list[Target], Field(min_length=1)]
    # When a limit that lists this model is exhausted, serve from the next pool (priority 1)
    # instead of answering 429; limits that count all of the team's models still apply.
    quota_failover: bool = False
    # A pooled model's attempt that sends nothing for this long (no headers, or a stream that
    # went silent) is abandoned: before its answer started, the next pool gets the request.
    # Long enough for a slow first token; 0 = no limit.
    stall_timeout_s: float = Field(default=60.0, ge=0, le=3600)
    guardrails: GuardLists = GuardLists()


# Set by the worker supervisor (`sidecar.workers`): this process's index among the workers.
WORKER_ENV = "EXTPROC_WORKER"


class SidecarSettings(_Strict):
    listen: str = Field(default="127.0.0.1:50051", description="HOST:PORT or unix:/path")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    default_encoding: str = "cl100k_base"
    # How long Envoy waits for one answer of the sidecar before failing the request.
    message_timeout_ms: int = Field(default=2000, ge=10, le=60_000)
    # How long counting a request's prompt may take, the wait for a tokenizer thread included:
    # what is not counted by then is estimated (ceil(utf-8 bytes / 4)). Below
    # message_timeout_ms; by default 500, or half of message_timeout_ms when that is lower.
    count_budget_ms: int = Field(default=500, ge=0, le=60_000)
    # What the client sees when the sidecar is down or too slow (fail closed).
    failure_status: int = Field(default=503, ge=400, le=599)
    grace_s: float = Field(default=30.0, ge=0, description="drain time on shutdown")
    # How often the file is checked for changes: a changed guard policy must apply within a
    # second (a stat() four times a second costs nothing). 0 = only SIGHUP and the admin API.
    reload_interval_s: float = Field(default=0.25, ge=0, description="0 = no file watching")
    # How SSE responses pass the sidecar. "observe": chunks are never held; a second,
    # observe-only filter follows a copy (a client that did not ask for usage gets no usage
    # chunk injected, so its completion is the sidecar's own count). "inline": every chunk
    # waits for the sidecar's answer (exact usage always). "auto": no stage of the sidecar
    # follows a stream that needs no change (the client asked for usage itself) when one
    # backend serves it and json_path is access_log: Envoy reads its usage report and the
    # access log brings it back; such a stream is observed when Envoy chooses the backend;
    # every other stream is inline.
    stream_path: Literal["auto", "inline", "observe"] = "auto"
    # How non-streamed answers of a model served by one backend pass the sidecar.
    # "access_log": Envoy sends the answer on without asking the sidecar (two ext_proc
    # messages per request instead of four); its usage reaches the sidecar in Envoy's gRPC
    # access log, where the quota is settled and the request counted (observed streams are
    # released with their body too). "inline": the sidecar reads each answer before it is
    # sent, and adds the x-aigw-*-tokens headers; nothing relies on the gRPC access log.
    # Answers that response guards judge, and those of pooled or canary models, are inline.
    json_path: Literal["access_log", "inline"] = "access_log"
    # Processes serving `listen` together (SO_REUSEPORT), to use several cores. What they
    # share must live outside them: quotas need `quota.store: redis` (checked at load).
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_address(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_count_budget(cls, data: Any) -> Any:
        # The default fits under a short message_timeout_ms: a config that sets only that loads.
        if isinstance(data, dict) and "count_budget_ms" not in data:
            timeout = data.get("message_timeout_ms")
            if type(timeout) is int and timeout < 1000:
                data = {**data, "count_budget_ms": max(0, timeout // 2)}
        return data

    @field_validator("count_budget_ms")
    @classmethod
    def _count_budget(cls, v: int, info: ValidationInfo) -> int:
        timeout = info.data.get("message_timeout_ms")
        if timeout is not None and v >= timeout:
            raise ValueError(
                f"must be below sidecar.message_timeout_ms ({timeout}): Envoy would give up on "
                "the request before its count is done"
            )
        return v


class EnvoySettings(_Strict):
    listen: str = "127.0.0.1:10000"
    admin: str = "127.0.0.1:9901"
    access_log: bool = True
    # Requests in flight through one Envoy: each holds an ext_proc stream to the sidecar for
    # its whole life (a long LLM stream too), so Envoy's default cap of 1024 is far too low.
    max_requests: int = Field(default=100_000, ge=1, le=10_000_000)
    # Envoy serves a request that needs no admission by the sidecar on its own (native.py): a
    # caller identified by a JWT, of a team with no limits and no guards, to a model of one
    # backend. Envoy then holds that backend's credential (from the same env or file).
    native_path: bool = True

    @field_validator("listen", "admin")
    @classmethod
    def _addr(cls, v: str) -> str:
        host, port = parse_address(v)
        if host.startswith("unix:") or port is None:
            raise ValueError("must be HOST:PORT")
        return v


class MetricsSettings(_Strict):
    # HTTP address serving Prometheus' /metrics. None: no endpoint (the counters still run,
    # for GetStats). Several sidecar processes may share one address (SO_REUSEPORT): each
    # answers with the sum over all of them (prometheus-client's multiprocess mode).
    listen: str | None = None
    # Metrics by user too (extproc_user_*): a series per user, so off unless asked for, and
    # at most max_users users per sidecar process (then "other").
    users: bool = False
    max_users: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, port = parse_address(v)
        if host.startswith("unix:") or port is None:
            raise ValueError("must be HOST:PORT")
        return v


class TracingSettings(_Strict):
    # Spans need the optional extra: pip install 'extproc[tracing]' (the OpenTelemetry SDK and
    # its OTLP exporter). Off, or without the SDK, no span is ever built.
    enabled: bool = False
    service_name: str = "extproc"
    # OTLP/gRPC collector, e.g. http://otel-collector:4317. None: the standard
    # OTEL_EXPORTER_OTLP_* environment variables decide (the SDK's default is localhost:4317).
    otlp_endpoint: str | None = None
    # For requests that arrive without a sampled trace; a sampled parent is always followed.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class AuditSettings(_Strict):
    # The append-only JSON-lines file of every request. None: no audit trail.
    path: Path | None = None
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096, description="rotate past this")
    backups: int = Field(default=10, ge=0, le=10_000, description="rotated files kept")
    # The prompt itself (PII and secrets masked) besides its hash. Off: only the hash.
    include_prompt: bool = False


class ObservabilitySettings(_Strict):
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    audit: AuditSettings = AuditSettings()


class JwksSource(_Strict):
    """Where an issuer's public keys (a JWKS document) come from: exactly one of them."""

    uri: str | None = Field(default=None, description="https://... fetched and cached by Envoy")
    file: Path | None = None
    inline: str | None = Field(default=None, description="the JWKS JSON itself (public keys)")
    # Envoy refetches every cache_s (less 5 s when above 5), in whole seconds, and never for a
    # token's unknown kid: below 1 s it would fetch in a loop.
    cache_s: int = Field(default=600, ge=1, le=86_400, description="for uri")
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="for uri")

    @model_validator(mode="after")
    def _exactly_one(self) -> JwksSource:
        given = [k for k in ("uri", "file", "inline") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'uri', 'file' or 'inline'")
        if self.uri is not None:
            parts = urlsplit(self.uri)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("uri must be an http:// or https:// URL with a host")
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
                # Whoever is on the path could serve their own keys and sign any token.
                raise ValueError("uri must be https:// (plain http only on loopback)")
        if self.inline is not None:
            problem = jwks_problem(self.inline)
            if problem is not None:
                raise ValueError(f"inline: {problem}")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.uri or "").hostname or ""

    @property
    def port(self) -> int:
        return url_port(self.uri or "")


ClaimName = Annotated[str, Field(min_length=1)]
# A top-level claim's name, or a list of names for a nested one (Keycloak's
# [realm_access, roles]).
ClaimPath = ClaimName | Annotated[list[ClaimName], Field(min_length=1)]
# What each kind of key must hold for Envoy to take it (RFC 7518, section 6).
_JWK_FIELDS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "oct": ("k",), "OKP": ("crv", "x")}


def jwks_problem(text: str) -> str | None:
    """Why a JWKS document would be refused by Envoy at start-up (None: it looks usable)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return "not JSON"
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        return 'not a JWKS: no "keys", or an empty list'
    for i, key in enumerate(keys):
        kty = key.get("kty") if isinstance(key, dict) else None
        if kty not in _JWK_FIELDS:
            return f"key {i}: kty must be one of {', '.join(_JWK_FIELDS)}"
        missing = [f for f in _JWK_FIELDS[kty] if not key.get(f)]
        if missing:
            return f"key {i} ({kty}): no {', '.join(missing)}"
    return None


class ClaimMatch(_Strict):
    """A verified token's `claim` is `value` (or, for a list claim, contains it): what a rule
    of an issuer matches (identity.claim_matches)."""

    claim: ClaimPath
    value: str

    @property
    def path(self) -> tuple[str, ...]:
        return claim_path(self.claim)


def claim_path(claim: str | list[str]) -> tuple[str, ...]:
    return (claim,) if isinstance(claim, str) else tuple(claim)


class ClaimRule(ClaimMatch):
    """A token matching the rule belongs to `team`."""

    team: str


class ModelRule(ClaimMatch):
    """A token matching the rule may use `models` (names of models or model_groups), within
    its team's."""

    models: list[str]


class JwtIssuer(_Strict):
    """An identity provider whose signed tokens (JWTs) Envoy verifies (jwt_authn)."""

    issuer: str = Field(min_length=1, description="the tokens' `iss`")
    audiences: list[str] = Field(default=[], description="one must be in `aud`; [] = any")
    jwks: JwksSource
    clock_skew_s: int = Field(default=60, ge=0, le=600)
    # The first rule a token's claims match names its team; a token no rule matches gets 403.
    teams: Annotated[list[ClaimRule], Field(min_length=1)]
    # The claim that names the user (a string): for user budgets, audit and traces. A token
    # without it is served as its team's, with no user.
    user_claim: ClaimPath = "sub"
    # When given, a token may use only the models of the rules its claims match (none: none),
    # within its team's models.
    models: list[ModelRule] | None = None

    @property
    def user_path(self) -> tuple[str, ...]:
        return claim_path(self.user_claim)


class IdentitySettings(_Strict):
    # Issuers by a name you choose; a request may carry an API key or one of their tokens.
    jwt: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")], JwtIssuer] = {}


class Config(_Strict):
    sidecar: SidecarSettings = SidecarSettings()
    envoy: EnvoySettings = EnvoySettings()
    quota: QuotaSettings = QuotaSettings()
    admin: AdminSettings = AdminSettings()
    prices: dict[str, Price] = {}
    model_groups: dict[Annotated[str, Field(pattern=_NAME)], list[str]] = {}
    organizations: dict[Annotated[str, Field(pattern=_NAME)], Organization] = {}
    teams: dict[Annotated[str, Field(pattern=_NAME)], Team]
    backends: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")], Backend]
    models: dict[Annotated[str, Field(pattern=_NAME)], Model]
    guards: dict[Annotated[str, Field(pattern=_GUARD_NAME)], Guard] = {}
    guardrails: GuardrailSettings = GuardrailSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    identities: IdentitySettings = IdentitySettings()
    keys: KeysSettings = KeysSettings()

    @property
    def records_shared(self) -> bool:
        """Every sidecar process sees the records of who owns a stored object (ownership.py):
        one process, or the Redis store."""
        return self.quota.store == "redis" or self.sidecar.workers == 1


# Top-level sections that belong to development tools, not to the gateway: the quickstart
# keeps the fake LLM's settings in the gateway's file, so `make run` needs one file. The gateway
# sets them aside unread (a reload ignores them too); `extproc up` and `extproc check` validate
# them with the tool's own schema (extproc.devtools). Any other unknown section is an error.
DEVTOOL_SECTIONS = frozenset({"fake_llm"})


def parse_address(value: str) -> tuple[str, int | None]:
    """`HOST:PORT`, `[v6]:PORT` or `unix:/path` -> (host or unix:path, port or None)."""
    if value.startswith("unix:"):
        if len(value) <= len("unix:"):
            raise ValueError("unix: needs a path")
        return value, None
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (or unix:/path)")
    return host.strip("[]"), int(port_s)


def _loc(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _cross_check(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, model in cfg.models.items():
        seen: set[str] = set()
        for i, target in enumerate(model.targets):
            where = f"models.{name}.targets.{i}.backend"
            if target.backend not in cfg.backends:
                problems.append((where, f"unknown backend {target.backend!r}"))
            if target.backend in seen:
                # Envoy's weighted_clusters picks a cluster, so one backend can appear once.
                problems.append((where, f"backend {target.backend!r} appears twice"))
            seen.add(target.backend)
        paths = {
            cfg.backends[t.backend].base_path for t in model.targets if t.backend in cfg.backends
        }
        adapted = [
            t.backend
            for t in model.targets
            if t.weight > 0
            and t.backend in cfg.backends
            and cfg.backends[t.backend].type != "openai"
        ]
        translated = [b for b in adapted if cfg.backends[b].type in TRANSLATED_TYPES]
        # (A model with such a backend has every request's path set by the sidecar.)
        if len(paths) > 1 and not adapted:
            # One route serves all of a model's backends, so they share its path rewrite.
            problems.append(
                (
                    f"models.{name}.targets",
                    f"the backends' URLs have different paths: {sorted(paths)}",
                )
            )
        if translated and model.type in ("completion", "embedding"):
            from .providers.registry import serves
            from .wire.openai.request import COMPLETIONS, EMBEDDINGS

            endpoint = EMBEDDINGS if model.type == "embedding" else COMPLETIONS
            unable = [b for b in translated if not serves(cfg.backends[b].type, endpoint.path)]
            if unable:
                problems.append(
                    (
                        f"models.{name}.targets",
                        f"backend {unable[0]!r} ({cfg.backends[unable[0]].type}) cannot serve "
                        f"{endpoint.path}: the gateway translates chat completions, and "
                        "embeddings where the provider has them",
                    )
                )
        if translated and model.type not in ("chat", "completion", "embedding"):
            problems.append(
                (
                    f"models.{name}.targets",
                    f"backend {translated[0]!r} ({cfg.backends[translated[0]].type}) cannot "
                    f"serve a {model.type} model: such requests go to their backend as they "
                    "are, which needs an OpenAI-compatible one",
                )
            )
        if sum(t.weight for t in model.targets) == 0:
            problems.append((f"models.{name}.targets", "the weights add up to 0"))
        priorities = sorted({t.priority for t in model.targets})
        if model.quota_failover and len(priorities) < 2:
            problems.append((f"models.{name}.quota_failover", "needs a target of priority 1"))
        if len(priorities) > 1:
            if priorities != list(range(len(priorities))):
                message = f"priorities must be 0, 1, 2, ... (got {priorities})"
                problems.append((f"models.{name}.targets", message))
            for p in priorities:
                if not any(t.weight > 0 for t in model.targets if t.priority == p):
                    problems.append(
                        (f"models.{name}.targets", f"no target of priority {p} has a weight")
                    )
    mapped = set()
    for issuer_name, issuer in cfg.identities.jwt.items():
        for i, rule in enumerate(issuer.teams):
            mapped.add(rule.team)
            if rule.team not in cfg.teams:
                where = f"identities.jwt.{issuer_name}.teams.{i}.team"
                problems.append((where, f"unknown team {rule.team!r}"))
        for i, model_rule in enumerate(issuer.models or ()):
            where = f"identities.jwt.{issuer_name}.models.{i}.models"
            problems += _check_model_names(cfg, where, model_rule.models)
    for org_name, org in cfg.organizations.items():
        where = f"organizations.{org_name}"
        problems += _check_model_names(cfg, f"{where}.models", org.models or [])
        problems += _check_limits(cfg, f"{where}.limits", org.limits, org_models(cfg, org_name))
    for team_name, team in cfg.teams.items():
        where = f"teams.{team_name}"
        if not team.keys and team_name not in mapped:
            problems.append((f"{where}.keys", "the team has no keys and no JWT maps to it"))
        if team.organization is not None and team.organization not in cfg.organizations:
            problems.append(
                (f"{where}.organization", f"unknown organization {team.organization!r}")
            )
            continue
        allowed = org_models(cfg, team.organization) if team.organization else cfg.models
        for i, model_name in enumerate(team.models or ()):
            if model_name not in cfg.models:
                problems.append((f"{where}.models.{i}", f"unknown model {model_name!r}"))
            elif model_name not in allowed:
                problems.append(
                    (f"{where}.models.{i}", f"organization {team.organization} may not use it")
                )
        models = team_models(cfg, team_name)
        problems += _check_limits(cfg, f"{where}.limits", team.limits, models)
        problems += _check_limits(cfg, f"{where}.user_limits", team.user_limits, models)
        for user, settings in team.users.items():
            problems += _check_limits(cfg, f"{where}.users.{user}.limits", settings.limits, models)
        names: set[str] = set()
        for i, key in enumerate(team.keys):
            problems += _check_model_names(cfg, f"{where}.keys.{i}.models", key.models or [])
            key_models = narrowed(cfg, models, key.models)
            problems += _check_limits(cfg, f"{where}.keys.{i}.limits", key.limits, key_models)
            if key.limits and key.name is None:
                # Its counters are kept under its name (a position would move with the list).
                problems.append((f"{where}.keys.{i}.name", "a key with limits needs a name"))
            if key.name is not None and key.name in names:
                problems.append((f"{where}.keys.{i}.name", f"two keys are called {key.name!r}"))
            if key.name is not None and key.name.startswith(
                (TOKEN_LABEL_PREFIX, RUN_TIME_KEY_PREFIX)
            ):
                # Its limits would apply to a token's callers, or to a run-time key's.
                message = f"may not start with {TOKEN_LABEL_PREFIX!r} or {RUN_TIME_KEY_PREFIX!r}"
                problems.append((f"{where}.keys.{i}.name", message))
            names.add(key.name or "")
    for group, members in cfg.model_groups.items():
        if group in cfg.models:
            problems.append((f"model_groups.{group}", "a group cannot share a model's name"))
        for i, member in enumerate(members):
            if member not in cfg.models:
                problems.append((f"model_groups.{group}.{i}", f"unknown model {member!r}"))
    for model_name in cfg.prices:
        if model_name not in cfg.models:
            problems.append((f"prices.{model_name}", "unknown model"))
    problems += _check_guard_lists(cfg)
    problems += _check_workers(cfg)
    if cfg.keys.enabled and cfg.admin.token is None:
        # KeyAdmin hands out credentials: not to whoever reaches the sidecar's port.
        problems.append(("keys.enabled", "needs admin.token (the admin API creates keys)"))
    return problems


def _check_workers(cfg: Config) -> list[tuple[str, str]]:
    if cfg.sidecar.workers == 1:
        return []
    problems = []
    if cfg.sidecar.listen.startswith("unix:"):
        problems.append(("sidecar.workers", "several workers need a HOST:PORT listen address"))
    limited = [name for name, team in cfg.teams.items() if has_budgets(cfg, name)]
    if limited and cfg.quota.store == "memory":
        problems.append(
            (
                "sidecar.workers",
                "several workers need quota.store: redis (each would count "
                f"{', '.join(limited)}'s quota on its own, letting it spend it once per worker)",
            )
        )
    return problems


# Guards that can judge a response (a prompt-size limit cannot).
_RESPONSE_GUARDS = {"pii", "deny", *EXTERNAL_GUARDS}


def _check_guard_lists(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    lists: list[tuple[str, list[str] | None, str]] = [
        ("guardrails.request", cfg.guardrails.request, "request"),
        ("guardrails.response", cfg.guardrails.response, "response"),
    ]
    for kind, owners in (("teams", cfg.teams), ("models", cfg.models)):
        for name, owner in owners.items():
            for stage in ("request", "response"):
                where = f"{kind}.{name}.guardrails.{stage}"
                lists.append((where, getattr(owner.guardrails, stage), stage))
    for where, names, stage in lists:
        for i, guard_name in enumerate(names or ()):
            guard = cfg.guards.get(guard_name)
            if guard is None:
                problems.append((f"{where}.{i}", f"unknown guard {guard_name!r}"))
            elif stage == "response" and guard.type not in _RESPONSE_GUARDS:
                problems.append((f"{where}.{i}", f"a {guard.type} guard cannot judge a response"))
    return problems


def stage_guards(cfg: Config, team: str, model: str) -> tuple[list[str], list[str]]:
    """The names of the guards of a team's request to a model, (request, response): the team's
    own lists or the defaults, then the model's, each guard once."""
    team_cfg, model_cfg = cfg.teams.get(team), cfg.models.get(model)
    out = []
    for stage in ("request", "response"):
        names = list(getattr(cfg.guardrails, stage))
        if team_cfg is not None and getattr(team_cfg.guardrails, stage) is not None:
            names = list(getattr(team_cfg.guardrails, stage))
        if model_cfg is not None:
            names += getattr(model_cfg.guardrails, stage) or []
        out.append(list(dict.fromkeys(names)))
    return out[0], out[1]


def expand_models(cfg: Config, names: Iterable[str]) -> tuple[str, ...]:
    """Names of models and model_groups -> the models, each once, in order."""
    out: list[str] = []
    for name in names:
        out += cfg.model_groups.get(name, [name])
    return tuple(dict.fromkeys(out))


def model_set(cfg: Config, names: Iterable[str] | None) -> frozenset[str] | None:
    """The models a list of model and group names allows (None: the list is not there)."""
    return None if names is None else frozenset(expand_models(cfg, names))


def organization_of(cfg: Config, team: str) -> str:
    """The team's organization; "" for none (or a team the config does not have)."""
    found = cfg.teams.get(team)
    return (found.organization or "") if found is not None else ""


def org_models(cfg: Config, org: str) -> tuple[str, ...]:
    """The models an organization's teams may use."""
    listed = cfg.organizations[org].models if org in cfg.organizations else None
    return tuple(cfg.models) if listed is None else expand_models(cfg, listed)


def team_models(cfg: Config, team_name: str) -> tuple[str, ...]:
    """The models a team may use: its own list, else its organization's, else all."""
    team = cfg.teams[team_name]
    if team.models is not None:
        return tuple(team.models)
    return org_models(cfg, team.organization) if team.organization else tuple(cfg.models)


def narrowed(cfg: Config, models: tuple[str, ...], names: list[str] | None) -> tuple[str, ...]:
    """`models` narrowed to a list of model and group names (None: not narrowed)."""
    if names is None:
        return models
    allowed = set(expand_models(cfg, names))
    return tuple(m for m in models if m in allowed)


def has_budgets(cfg: Config, team_name: str) -> bool:
    """Any limit at any level applies to some of the team's requests (static keys' included)."""
    team = cfg.teams[team_name]
    org = cfg.organizations.get(team.organization or "")
    return bool(
        team.limits
        or team.user_limits
        or any(u.limits for u in team.users.values())
        or any(k.limits for k in team.keys)
        or (org is not None and org.limits)
    )


def limit_models(cfg: Config, models: tuple[str, ...], limit: Limit) -> tuple[str, ...]:
    """The models a limit counts: its own list (groups expanded), or all the models of its
    level (`models`: the team's, the organization's)."""
    return models if limit.models is None else expand_models(cfg, limit.models)


def key_label(team: str, index: int, key: ApiKey) -> str:
    """How a config file's key is named in counters, metrics and the audit: its `name`, else
    its place (`<team>#<index>`)."""
    return key.name or f"{team}#{index}"


def limit_name(limit: Limit) -> str:
    return limit.name or f"{limit.metric}-{limit.window}"


def _check_model_names(cfg: Config, where: str, names: list[str]) -> list[tuple[str, str]]:
    return [
        (f"{where}.{i}", f"unknown model or group {name!r}")
        for i, name in enumerate(names)
        if name not in cfg.models and name not in cfg.model_groups
    ]


def _check_limits(
    cfg: Config, where: str, limits: list[Limit], models: tuple[str, ...]
) -> list[tuple[str, str]]:
    """One level's list of limits (`where`: its path), counting at most `models`."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, limit in enumerate(limits):
        name = limit_name(limit)
        if name in seen:
            problems.append((f"{where}.{i}.name", f"two limits are called {name!r}: name them"))
        seen.add(name)
        problems += _check_model_names(cfg, f"{where}.{i}.models", limit.models or [])
        if limit.usd is not None:
            unpriced = [m for m in limit_models(cfg, models, limit) if m not in cfg.prices]
            if unpriced:
                problems.append(
                    (f"{where}.{i}.usd", f"no price for {', '.join(unpriced)} (prices:)")
                )
    return problems


def validation_problems(exc: ValidationError, loc: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Pydantic's errors as (field path, message), the path prefixed with `loc`."""
    problems = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append((_loc((*loc, *err["loc"])), msg))
    return problems


def parse_config(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError([("", "the file must hold a mapping")], source)
    gateway = {key: value for key, value in data.items() if key not in DEVTOOL_SECTIONS}
    try:
        cfg = Config.model_validate(gateway)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc), source) from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice: the second `team-a:` would silently win."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_config(path: str | os.PathLike[str]) -> Config:
    return parse_config(read_config_file(path), str(path))


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """The file's YAML, not yet validated: what `parse_config` and the dev tools' sections read."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [("", f"not valid UTF-8: {exc.reason} at byte {exc.start}")], source
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"not valid YAML: {exc}")], source) from None
    return data


# ---------------------------------------------------------------------------------------------
# Runtime: what the sidecar serves with.


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    model: str  # the name clients use
    backend: str
    provider_model: str
    weight: int
    auth_header: str
    credential: str | None  # the full header value, e.g. "Bearer sk-..."; never logged
    provider: str = "openai"  # the API the backend speaks (Backend.type)
    max_tokens: int = 4096  # what a translated request asks for when the client set none
    base_path: str = "/v1"  # Backend.base_path: what replaces the client's /v1
    api_version: str = ""  # Azure's deployment API: the api-version of its requests
    # Backend.token_from: the credential is a token the sidecar keeps (backend_tokens.py)
    token_from: str | None = None
    # Bedrock signed with AWS credentials: the region (Envoy signs, or the sidecar in a pool)
    signing_region: str | None = None
    host: str = ""  # the backend URL's host: the Host its requests are sent (and signed) with
    url_path: str = ""  # the backend URL's own path, without a trailing slash ("" for none)
    # Backend.apis: the client APIs it serves as they are (wire format names)
    apis: frozenset[str] = frozenset({"openai"})


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A static key of the config file, resolved."""

    team: str
    label: str  # its name, or "<team>#<position>"; never the key
    digest: bytes  # sha256 of the key
    user: str = ""
    models: frozenset[str] | None = None  # narrower than the team's (groups expanded)
    limited: bool = False  # it has limits of its own


@dataclass(slots=True)
class Runtime:
    config: Config
    # sha256(key) -> the key
    key_index: dict[bytes, KeyEntry] = field(default_factory=dict)
    # team -> model names it may use, in config order
    team_models: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (model, backend) -> target
    targets: dict[tuple[str, str], ResolvedTarget] = field(default_factory=dict)
    admin_token: str | None = None  # never logged
    guard_keys: dict[str, str] = field(default_factory=dict)  # guard -> API key; never logged
    # model -> its targets whose backend is not a plain OpenAI one (another API, translated;
    # or Azure's deployment paths), for the models that have any: the sidecar sets such a
    # model's paths and reads its answers
    adapted: dict[str, tuple[ResolvedTarget, ...]] = field(default_factory=dict)
    # The models with a backend that refuses a request for a stream's usage (an Azure
    # deployment before api-version 2024-09-01): their streams are not asked for one.
    unasked_usage: frozenset[str] = frozenset()

    def key(self, presented: str) -> KeyEntry | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        # Looking up by digest leaks nothing useful about the key (an attacker cannot steer
        # a sha256 prefix); compare_digest keeps the final equality check constant-time too.
        hit = self.key_index.get(digest)
        if hit is None:
            return None
        return hit if hmac.compare_digest(digest, hit.digest) else None

    def may_use(self, team: str, model: str) -> bool:
        return model in self.team_models.get(team, ())

    @property
    def digest(self) -> str:
        """sha256 of the validated config (secrets are references in it, never values)."""
        return hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()


def build_runtime(cfg: Config, source: str = "config") -> Runtime:
    """Resolve secrets and build lookup tables; every problem is reported with its field."""
    rt = Runtime(config=cfg)
    problems: list[tuple[str, str]] = []
    for team_name, team in cfg.teams.items():
        for i, key in enumerate(team.keys):
            where = f"teams.{team_name}.keys.{i}"
            label = key_label(team_name, i, key)
            if key.sha256 is not None:
                digest = bytes.fromhex(key.sha256)
            else:
                try:
                    ref = SecretRef(env=key.env, file=key.file)
                    digest = hashlib.sha256(ref.resolve().encode()).digest()
                except LookupError as exc:
                    problems.append((where, str(exc)))
                    continue
            models = model_set(cfg, key.models)
            entry = KeyEntry(team_name, label, digest, key.user or "", models, bool(key.limits))
            other = rt.key_index.get(digest)
            if other is not None:
                # The same key twice as the same caller is harmless; as two, which would it be?
                same = (other.team, other.user, other.models) == (team_name, entry.user, models)
                if not same or entry.limited or other.limited:
                    message = f"the same key is also {other.label!r} of {other.team!r}"
                    problems.append((where, message))
                continue
            rt.key_index[digest] = entry
        rt.team_models[team_name] = team_models(cfg, team_name)

    credentials: dict[str, str | None] = {}
    for name, backend in cfg.backends.items():
        if backend.api_key is None:
            credentials[name] = None
            continue
        try:
            secret = backend.api_key.resolve()
        except LookupError as exc:
            problems.append((f"backends.{name}.api_key", str(exc)))
            continue
        credentials[name] = f"Bearer {secret}" if backend.auth_header == "authorization" else secret

    for model_name, model in cfg.models.items():
        for target in model.targets:
            backend = cfg.backends[target.backend]
            rt.targets[(model_name, target.backend)] = ResolvedTarget(
                model=model_name,
                backend=target.backend,
                provider_model=target.model or model_name,
                weight=target.weight,
                auth_header=backend.auth_header,
                credential=credentials.get(target.backend),
                provider=backend.type,
                max_tokens=backend.max_tokens,
                base_path=backend.base_path,
                url_path=urlsplit(backend.url).path.rstrip("/"),
                api_version=backend.api_version,
                token_from=backend.token_from,
                signing_region=backend.signing_region,
                host=backend.host,
                apis=backend.apis,
            )
    for resolved in rt.targets.values():
        # (A parked target, weight 0, serves nothing: it does not make its model adapted.)
        if resolved.provider != "openai" and resolved.weight > 0:
            rt.adapted[resolved.model] = (*rt.adapted.get(resolved.model, ()), resolved)
    from .providers.registry import takes_usage_request  # (providers read config's types)

    rt.unasked_usage = frozenset(
        model
        for model, targets in rt.adapted.items()
        if not all(takes_usage_request(t) for t in targets)
    )
    if cfg.admin.token is not None:
        try:
            rt.admin_token = cfg.admin.token.resolve()
        except LookupError as exc:
            problems.append(("admin.token", str(exc)))
    for name, guard in cfg.guards.items():
        if guard.api_key is not None:
            try:
                rt.guard_keys[name] = guard.api_key.resolve()
            except LookupError as exc:
                problems.append((f"guards.{name}.api_key", str(exc)))
    for name, issuer in cfg.identities.jwt.items():
        # Envoy reads the file; a bad one would only show as Envoy refusing to start.
        path = issuer.jwks.file
        if path is not None:
            where = f"identities.jwt.{name}.jwks.file"
            try:
                problem = jwks_problem(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"cannot read {path}: {exc}"
            if problem is not None:
                problems.append((where, problem))
    if cfg.quota.store == "redis" and cfg.quota.redis.password is not None:
        try:
            cfg.quota.redis.password.resolve()
        except LookupError as exc:
            problems.append(("quota.redis.password", str(exc)))
    if problems:
        raise ConfigError(problems, source)
    return rt


def load_runtime(path: str | os.PathLike[str]) -> Runtime:
    return build_runtime(load_config(path), str(path))


def pooled(model: Model) -> bool:
    """Failover pools: targets of several priorities, each a pool Envoy retries on in turn."""
    return len({t.priority for t in model.targets}) > 1


def pools(model: Model) -> list[list[Target]]:
    """The model's serving targets by priority (weight 0 serves nowhere)."""
    by_priority: dict[int, list[Target]] = {}
    for t in model.targets:
        if t.weight > 0:
            by_priority.setdefault(t.priority, []).append(t)
    return [by_priority[p] for p in sorted(by_priority)]


def split(model: Model) -> bool:
    """A canary: Envoy picks one of several backends by weight (one pool)."""
    return len({t.priority for t in model.targets}) == 1 and (
        len([t for t in model.targets if t.weight > 0]) > 1
    )
