"""Bearer tokens of the backends whose credential comes from an identity instead of a key
(`backends.<b>.token_from`): Entra ID through azure-identity (Azure OpenAI), Google's
application default credentials through google-auth (Vertex AI); and the AWS credentials the
sidecar signs a pooled Bedrock backend's requests with (botocore's standard chain;
aws_signing.py).

Each is fetched when the backend appears (start-up, a reload), kept, and refreshed in the
background well before it expires; the request path only reads the current one, never waits
for an identity provider. A backend whose token could not be fetched (or has expired) answers
its requests with a 503 in the client's shape that says why, until a retry succeeds. Tokens
are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

from .errors import GatewayError

if TYPE_CHECKING:
    from .config import Runtime

log = logging.getLogger("extproc.backend_tokens")

AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# How long one fetch may take; the first one at start-up or reload is waited for this long.
FETCH_TIMEOUT_S = 10.0
# A token is refreshed this long before it expires (or at half its life, if that is sooner).
REFRESH_MARGIN_S = 300.0
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # after failed fetches, then every 30 s


class TokenSource(Protocol):
    async def fetch(self) -> tuple[Any, float]:
        """A fresh token (or AWS credentials) and when it expires (seconds since the epoch)."""
        ...

    async def close(self) -> None: ...


class AzureIdentity:
    """azure-identity's DefaultAzureCredential (environment, workload identity, managed
    identity, Azure CLI, ...), for Azure AI services' scope."""

    def __init__(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        self.credential = DefaultAzureCredential()

    async def fetch(self) -> tuple[str, float]:
        token = await self.credential.get_token(AZURE_SCOPE)
        return token.token, float(token.expires_on)

    async def close(self) -> None:
        await self.credential.close()


class GoogleADC:
    """google-auth's application default credentials (GOOGLE_APPLICATION_CREDENTIALS, the
    gcloud user's, a workload identity, the metadata server), for Google Cloud's scope. Its
    calls block: they run in a thread."""

    def __init__(self) -> None:
        self.credentials: object | None = None

    def _refresh(self) -> tuple[str, float]:
        import google.auth
        import google.auth.transport.requests

        if self.credentials is None:
            self.credentials, _ = google.auth.default(scopes=[GOOGLE_SCOPE])
        credentials = self.credentials
        # google-auth waits 120 s for its token endpoint by default: a thread held that long.
        request = functools.partial(
            google.auth.transport.requests.Request(), timeout=FETCH_TIMEOUT_S
        )
        credentials.refresh(request)  # type: ignore[attr-defined]
        expiry = credentials.expiry  # type: ignore[attr-defined]
        # google-auth's expiry is a naive UTC datetime (None: it said none; an hour is usual).
        expires = expiry.replace(tzinfo=UTC).timestamp() if expiry else time.time() + 3600
        return credentials.token, expires  # type: ignore[attr-defined]

    async def fetch(self) -> tuple[str, float]:
        return await _in_thread(self._refresh)

    async def close(self) -> None:
        pass


class AwsChain:
    """botocore's standard AWS credential chain (environment, shared profile, web identity,
    container and instance roles): the frozen credentials and, for temporary ones, when they
    expire. Its calls block (files, STS, the metadata services): they run in a thread."""

    def __init__(self) -> None:
        self.credentials: Any = None

    def _refresh(self) -> tuple[Any, float]:
        import botocore.session  # type: ignore[import-untyped]

        if self.credentials is None:
            self.credentials = botocore.session.get_session().get_credentials()
            if self.credentials is None:
                raise LookupError("no AWS credentials in botocore's credential chain")
        frozen = self.credentials.get_frozen_credentials()  # refreshed when near expiry
        expiry = getattr(self.credentials, "_expiry_time", None)
        # Long-lived keys: looked at again in an hour (a changed profile file, say).
        return frozen, expiry.timestamp() if expiry is not None else time.time() + 3600

    async def fetch(self) -> tuple[Any, float]:
        return await _in_thread(self._refresh)

    async def close(self) -> None:
        pass


# The blocking credential calls get threads of their own: a token endpoint that hangs must not
# hold the default executor's, which local guards and the audit record use on every request.
# (A fetch that timed out may still hold its thread until the library gives up: two at most.)
_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="backend-tokens")


async def _in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, call)


SOURCES: dict[str, Callable[[], TokenSource]] = {
    "azure_identity": AzureIdentity,
    "google_adc": GoogleADC,
    "aws": AwsChain,
}


@dataclass(slots=True)
class _Held:
    kind: str
    source: TokenSource
    task: asyncio.Task[None] | None = None
    secret: Any = None  # the token, or AWS credentials; never logged
    expires: float = 0.0
    problem: str = "no token fetched yet"


class BackendTokens:
    """The current token of each backend that takes one; kept across reloads (a backend whose
    identity did not change keeps its token)."""

    def __init__(self, sources: dict[str, Callable[[], TokenSource]] | None = None) -> None:
        self.sources = SOURCES if sources is None else sources
        self.held: dict[str, _Held] = {}

    def header(self, backend: str) -> str:
        """The Authorization value for `backend`; raises the 503 of a backend without a valid
        token (the reason said, never the token)."""
        return f"Bearer {self._secret(backend)}"

    def aws_credentials(self, backend: str) -> Any:
        """The AWS credentials to sign `backend`'s requests with (botocore's frozen ones);
        raises the 503 of a backend without valid ones."""
        return self._secret(backend)

    def _secret(self, backend: str) -> Any:
        held = self.held.get(backend)
        if held is not None and held.secret is not None and held.expires > time.time():
            return held.secret
        if held is None:
            problem = "its identity is not configured"
        elif held.secret is not None:
            problem = f"its token expired: {held.problem or 'not refreshed in time'}"
        else:
            problem = held.problem
        raise GatewayError(
            503,
            f"The gateway has no valid credential for backend {backend!r} ({problem}); retry later",
            "server_error",
            "backend_credential_unavailable",
        )

    async def configure(self, runtime: Runtime) -> None:
        """Follow the config: sources for new backends (their first token waited for, at most
        FETCH_TIMEOUT_S), the dropped or changed ones closed. A reload calls prepare(), swaps
        its config in, then retire(): the config still serving keeps its tokens meanwhile."""
        await self.prepare(runtime)
        await self.retire(runtime)

    async def retire(self, runtime: Runtime) -> None:
        """Close the sources of backends `runtime` no longer has."""
        wanted = _wanted(runtime)
        for name in [n for n, h in self.held.items() if wanted.get(n) != h.kind]:
            await self._drop(name)

    async def prepare(self, runtime: Runtime) -> None:
        """Sources for the backends new to `runtime`, their first tokens fetched (a backend
        whose identity changed kind is replaced now)."""
        wanted = _wanted(runtime)
        for name in [n for n, h in self.held.items() if n in wanted and wanted[n] != h.kind]:
            await self._drop(name)
        fresh = []
        for name, kind in wanted.items():
            if name not in self.held:
                self.held[name] = held = _Held(kind, self.sources[kind]())
                fresh.append((name, held))
        if fresh:
            await asyncio.gather(*(self._fetch(name, held) for name, held in fresh))
        for name, held in fresh:
            held.task = asyncio.create_task(self._keep(name, held), name=f"token {name}")

    async def close(self) -> None:
        for name in list(self.held):
            await self._drop(name)

    async def _drop(self, name: str) -> None:
        held = self.held.pop(name)
        if held.task is not None:
            held.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held.task
        with contextlib.suppress(Exception):
            await held.source.close()

    async def _fetch(self, name: str, held: _Held) -> bool:
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                token, expires = await held.source.fetch()
        except Exception as exc:
            # The client (and the audit record) get the kind of failure; the detail, which
            # may name a tenant, an account or a file, goes to the log only.
            held.problem = f"{held.kind}: {type(exc).__name__}"
            log.warning("backend %s: no token from %s: %s", name, held.kind, str(exc)[:500])
            return False
        held.secret, held.expires = token, expires
        held.problem = ""
        log.info("backend %s: token from %s, valid %.0f s", name, held.kind, expires - time.time())
        return True

    async def _keep(self, name: str, held: _Held) -> None:
        failures = 0 if held.secret is not None else 1
        while True:
            if failures:
                delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
            else:
                life = held.expires - time.time()
                delay = max(1.0, min(life - REFRESH_MARGIN_S, life / 2))
            await asyncio.sleep(delay)
            failures = 0 if await self._fetch(name, held) else failures + 1


def _wanted(runtime: Runtime) -> dict[str, str]:
    """backend -> the kind of credential the sidecar keeps for it."""
    wanted: dict[str, str] = {
        name: b.token_from
        for name, b in runtime.config.backends.items()
        if b.token_from is not None
    }
    wanted.update(dict.fromkeys(pool_signed(runtime), "aws"))
    return wanted


def pool_signed(runtime: Runtime) -> set[str]:
    """The Bedrock backends signed with AWS credentials that serve in a failover pool: the
    sidecar signs their pooled attempts (Envoy signs in their own clusters)."""
    from .config import pooled

    cfg = runtime.config
    return {
        t.backend
        for model in cfg.models.values()
        if pooled(model)
        for t in model.targets
        if cfg.backends[t.backend].signing_region is not None
    }
