"""Backends whose credential is an identity's token (backend_tokens.py): fetched before use,
refreshed before it expires, a 503 that says why when there is none; and the real credential
code (azure-identity, google-auth) against the fake's identity endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc import backend_tokens
from extproc.aws_signing import signed_headers
from extproc.backend_tokens import AwsChain, AzureIdentity, BackendTokens, GoogleADC
from extproc.config import ConfigError, build_runtime, parse_config
from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.devtools.fake_llm.identity import IDENTITY_HEADER_SECRET
from extproc.errors import GatewayError

from .test_fake_llm import _running


class Source:
    """A token source that says what it was told to (unit tests only)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script  # each fetch: (token, lifetime_s), an exception, or "hang"
        self.fetches = 0
        self.closed = False

    async def fetch(self) -> tuple[str, float]:
        step = self.script[min(self.fetches, len(self.script) - 1)]
        self.fetches += 1
        if step == "hang":
            await asyncio.sleep(3600)
        if isinstance(step, Exception):
            raise step
        token, life = step
        return token, time.time() + life

    async def close(self) -> None:
        self.closed = True


def runtime(*backends: str, kind: str = "azure_identity") -> Any:
    return build_runtime(
        parse_config(
            {
                "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
                "backends": {
                    b: {
                        "url": "https://r.openai.azure.com/openai",
                        "type": "azure",
                        "token_from": kind,
                    }
                    for b in backends
                },
                "models": {"m": {"targets": [{"backend": backends[0], "model": "d"}]}},
            }
        )
    )


async def until(condition: Any) -> float:
    """Waits for condition() (polled: a loaded machine's timers run late), 5 s at most; the
    seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - state of another task, polled
            await asyncio.sleep(0.01)
    return time.monotonic() - started


def tokens_with(sources: dict[str, Source]) -> BackendTokens:
    made = iter(sources.values())
    return BackendTokens({"azure_identity": lambda: next(made)})


def test_the_first_token_is_there_before_any_request() -> None:
    async def main() -> None:
        tokens = tokens_with({"az": Source([("t1", 3600)])})
        with pytest.raises(GatewayError) as caught:
            tokens.header("az")
        assert caught.value.status == 503 and caught.value.code == "backend_credential_unavailable"
        await tokens.configure(runtime("az"))
        assert tokens.header("az") == "Bearer t1"
        await tokens.close()

    asyncio.run(main())


def test_a_token_is_refreshed_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_tokens, "REFRESH_MARGIN_S", 0.5)

    async def main() -> None:
        source = Source([("t1", 1.6), ("t2", 3600)])
        tokens = tokens_with({"az": source})
        await tokens.configure(runtime("az"))
        assert tokens.header("az") == "Bearer t1"
        # Refreshed at its life less the margin (~1.1 s), or half of it (0.8 s) if sooner:
        # then at 1 s (the least wait), well before it expires at 1.6 s.
        took = await until(lambda: source.fetches == 2)
        assert 0.9 < took < 1.6 and tokens.header("az") == "Bearer t2"
        await tokens.close()
        assert source.closed

    asyncio.run(main())


def test_a_failed_fetch_says_why_and_is_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backend_tokens, "RETRY_S", (0.2,))

    async def main() -> None:
        source = Source([RuntimeError("tenant 1234: identity endpoint unreachable"), ("t2", 3600)])
        tokens = tokens_with({"az": source})
        await tokens.configure(runtime("az"))
        with pytest.raises(GatewayError) as caught:
            tokens.header("az")
        # The client learns the kind of failure; the detail (a tenant, an account, a file)
        # is the operator's, in the log.
        assert "'az' (azure_identity: RuntimeError)" in caught.value.message
        assert "tenant" not in caught.value.message
        assert "tenant 1234: identity endpoint unreachable" in caplog.text
        await until(lambda: source.fetches == 2)  # retried after RETRY_S[0]
        assert tokens.header("az") == "Bearer t2"
        await tokens.close()

    asyncio.run(main())


def test_a_failed_refresh_keeps_the_token_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_tokens, "REFRESH_MARGIN_S", 0.0)
    monkeypatch.setattr(backend_tokens, "RETRY_S", (5.0,))

    async def main() -> None:
        source = Source([("t1", 3.0), RuntimeError("down")])
        tokens = tokens_with({"az": source})
        await tokens.configure(runtime("az"))
        await until(lambda: source.fetches == 2)  # the refresh at half its life (1.5 s) failed
        assert tokens.header("az") == "Bearer t1"
        expires = tokens.held["az"].expires
        await until(lambda: time.time() > expires)  # expired now, and no newer one
        with pytest.raises(GatewayError) as caught:
            tokens.header("az")
        assert "expired: azure_identity: RuntimeError" in caught.value.message
        await tokens.close()

    asyncio.run(main())


def test_a_hanging_identity_provider_delays_start_up_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend_tokens, "FETCH_TIMEOUT_S", 0.2)

    async def main() -> None:
        tokens = tokens_with({"az": Source(["hang"])})
        started = time.monotonic()
        await tokens.configure(runtime("az"))
        assert time.monotonic() - started < 2
        with pytest.raises(GatewayError) as caught:
            tokens.header("az")
        assert "TimeoutError" in caught.value.message
        await tokens.close()

    asyncio.run(main())


def test_a_reload_keeps_the_tokens_of_backends_it_kept() -> None:
    async def main() -> None:
        a, b = Source([("a1", 3600)]), Source([("b1", 3600)])
        tokens = tokens_with({"a": a, "b": b})
        await tokens.configure(runtime("a", "b"))
        # The reload's order: the new config's tokens, the swap, then the old ones dropped;
        # until the swap, the config still serving keeps b's.
        await tokens.prepare(runtime("a"))
        assert tokens.header("b") == "Bearer b1"
        await tokens.retire(runtime("a"))
        assert b.closed and not a.closed and a.fetches == 1
        assert tokens.header("a") == "Bearer a1"
        with pytest.raises(GatewayError):
            tokens.header("b")
        await tokens.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("backend", "problem"),
    [
        ({"type": "anthropic", "token_from": "azure_identity"}, "for a backend of type"),
        ({"type": "azure", "token_from": "google_adc"}, "for a backend of type"),
        (
            {"type": "azure", "token_from": "azure_identity", "api_key": {"env": "X"}},
            "not both",
        ),
        ({"type": "openai", "api_version": "2024-10-21"}, "api_version is for an azure"),
    ],
)
def test_identity_settings_are_checked_at_load(backend: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
                "backends": {"b": {"url": "https://example.com/v1", **backend}},
                "models": {"m": {"targets": [{"backend": "b"}]}},
            }
        )
    assert any(where == "backends.b" and problem in p for where, p in caught.value.problems)


# -- the real credential code, against the fake's identity endpoints ----------------------------


@pytest.fixture(scope="module")
def identity_port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="identity")) as bound:
        yield bound


def test_entra_id_through_azure_identity(
    identity_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DefaultAzureCredential finds App Service's managed identity (IDENTITY_ENDPOINT and
    IDENTITY_HEADER, the variables App Service sets) and takes a token from it."""
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "IDENTITY_ENDPOINT", f"http://127.0.0.1:{identity_port}/_fake/identity/azure-msi"
    )
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER_SECRET)

    async def main() -> tuple[str, float]:
        source = AzureIdentity()
        try:
            return await source.fetch()
        finally:
            await source.close()

    token, expires = asyncio.run(main())
    assert token.startswith("fake-azure-")
    assert 3000 < expires - time.time() <= 3600


def test_google_application_default_credentials_through_google_auth(
    identity_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service account key file (GOOGLE_APPLICATION_CREDENTIALS) whose token endpoint is the
    fake's: google-auth signs its assertion and trades it for a token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "gateway-test",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "gateway@gateway-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"http://127.0.0.1:{identity_port}/_fake/identity/google-token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))

    async def main() -> tuple[str, float]:
        source = GoogleADC()
        try:
            return await source.fetch()
        finally:
            await source.close()

    token, expires = asyncio.run(main())
    assert token.startswith("fake-google-")
    assert 3000 < expires - time.time() <= 3600


def test_aws_credentials_through_botocores_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain's first link, the environment; temporary credentials keep their token."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCHAIN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "chain-token")
    credentials, expires = asyncio.run(AwsChain().fetch())
    assert (credentials.access_key, credentials.token) == ("AKIDCHAIN", "chain-token")
    assert expires > time.time()
    headers = signed_headers(credentials, "us-east-1", "bedrock-runtime.us-east-1.amazonaws.com",
                             "/model/m%3A0/converse", b"{}", "application/json")  # fmt: skip
    assert (
        headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDCHAIN/")
        and "/us-east-1/bedrock/aws4_request" in headers["authorization"]
    )
    assert headers["x-amz-security-token"] == "chain-token" and "x-amz-date" in headers


def test_only_pooled_bedrock_backends_are_signed_by_the_sidecar() -> None:
    cfg = {
        "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
        "backends": {
            "alone": {"url": "https://bedrock-runtime.us-east-1.amazonaws.com", "type": "bedrock"},
            "pooled": {"url": "https://bedrock-runtime.eu-west-3.amazonaws.com", "type": "bedrock"},
            "keyed": {
                "url": "https://bedrock-runtime.us-west-2.amazonaws.com",
                "type": "bedrock",
                "api_key": {"env": "PATH"},
            },
            "openai": {"url": "https://api.openai.com/v1"},
        },
        "models": {
            "a": {"targets": [{"backend": "alone", "model": "m"}]},
            "p": {
                "targets": [
                    {"backend": "openai", "priority": 0},
                    {"backend": "pooled", "model": "m", "priority": 1},
                    {"backend": "keyed", "model": "m", "priority": 2},
                ]
            },
        },
    }
    assert backend_tokens.pool_signed(build_runtime(parse_config(cfg))) == {"pooled"}
