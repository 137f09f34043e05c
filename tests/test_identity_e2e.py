"""JWT identities and the native path through the real Envoy, with the openai SDK as the client.

Tokens are minted here (RS256, PyJWT) and verified by Envoy's jwt_authn filter against a JWKS
served on loopback, which Envoy fetches when it starts; their claims name the team. Team `ml`
has no limits and no guards: Envoy serves its requests to one-backend models on its own
(native.py), and the sidecar only accounts them from the access log. Team `search` has a
limit: its requests take the strict path through the sidecar, as every API key's does.
"""

from __future__ import annotations

import http.server
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from .conftest import BACKEND_A_SECRET, Gateway, QuietHandler, running_gateway, serving

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.example.test/"
AUDIENCE = "extproc"
MODEL = "gpt-4o-mini"  # one backend (fake-a), its own name: native for team ml
RESPONSE_TOKENS = 8


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


SIGNING_KEY = _key()
FOREIGN_KEY = _key()  # not in the JWKS


def token(groups: list[str], key: rsa.RSAPrivateKey = SIGNING_KEY, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "jane", "iat": now, "exp": now + 600}
    payload.update(groups=groups, **claims)
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


def jwks_document() -> bytes:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}).encode()


class JwksServer(http.server.ThreadingHTTPServer):
    """The identity provider's JWKS endpoint, counting its fetches."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JwksHandler)
        self.fetches = 0


class JwksHandler(QuietHandler):
    def do_GET(self) -> None:
        assert isinstance(self.server, JwksServer)
        self.server.fetches += 1
        self.reply(200, jwks_document())


def with_identities(jwks: dict[str, Any]) -> Any:
    def edit(config: dict) -> None:
        config["teams"]["ml"] = {}
        config["teams"]["search"] = {
            "limits": [{"name": "daily", "window": "day", "tokens": 1_000_000}]
        }
        config["identities"] = {
            "jwt": {
                "corp": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "jwks": jwks,
                    # First match wins: a member of both groups is in `search`.
                    "teams": [
                        {"claim": "groups", "value": "search", "team": "search"},
                        {"claim": "groups", "value": "ml-platform", "team": "ml"},
                    ],
                }
            }
        }

    return edit


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    yield from serving(JwksServer())


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, jwks_server: JwksServer) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("identity")
    uri = f"http://127.0.0.1:{jwks_server.server_address[1]}/.well-known/jwks.json"
    with running_gateway(tmp, edit=with_identities({"uri": uri})) as gateway:
        yield gateway


def test_envoy_fetched_the_jwks_at_start_and_keeps_it(gw: Gateway, jwks_server: JwksServer) -> None:
    fetched = jwks_server.fetches
    assert fetched >= 1  # at start-up (async_fetch), before any request needed it
    for _ in range(3):
        # Team `search`: the tests below count team `ml`'s tokens, and these are accounted a
        # moment later, from the access log.
        client(gw, token(["search"])).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert jwks_server.fetches == fetched  # kept for cache_s


def client(gw: Gateway, bearer: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=bearer, max_retries=0)


def envoy_stat(gw: Gateway, name: str) -> int:
    with urllib.request.urlopen(f"http://{gw.admin}/stats?filter=^{name}$&format=json") as r:
        stats = json.load(r)["stats"]
    return sum(int(s.get("value", 0)) for s in stats)


def sidecar_streams(gw: Gateway) -> int:
    """ext_proc streams Envoy opened to the sidecar so far (every stage)."""
    return envoy_stat(gw, "http.aigw.ext_proc.streams_started")


def metric(gw: Gateway, name: str, **labels: str) -> float:
    port = gw.config["observability"]["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def eventually(check: Any, timeout: float = 5.0, say: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached in time: {say() if say else ''}"
        time.sleep(0.05)


def ml_output_tokens(gw: Gateway) -> float:
    return metric(gw, "extproc_tokens_total", team="ml", model=MODEL, type="output")


def counted_once_more(gw: Gateway, before: float) -> None:
    """The access log brought one more answer of team ml back, and its tokens were counted."""
    eventually(
        lambda: ml_output_tokens(gw) == before + RESPONSE_TOKENS,
        say=lambda: (
            before,
            ml_output_tokens(gw),
            [e for e in gw.access_log() if "native" in str(e.get("route"))][-2:],
        ),
    )


def test_a_native_request_never_reaches_the_sidecar_and_is_accounted(gw: Gateway) -> None:
    gw.clear_fakes()
    before = sidecar_streams(gw)
    tokens_before = ml_output_tokens(gw)
    raw = client(gw, token(["ml-platform"])).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=16
    )
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    assert sidecar_streams(gw) == before  # no ext_proc stream was opened for it
    assert raw.headers["x-aigw-team"] == "ml" and raw.headers["x-aigw-backend"] == "fake-a"
    (sent,) = gw.fake_requests(gw.fake_a)
    # Envoy set the backend's own credential; the client's token went nowhere.
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    assert "accept-encoding" not in sent["headers"]
    counted_once_more(gw, tokens_before)
    assert metric(gw, "extproc_requests_total", team="ml", model=MODEL, status="200") >= 1


def test_a_native_stream_with_its_usage_report_is_accounted(gw: Gateway) -> None:
    before = sidecar_streams(gw)
    tokens_before = ml_output_tokens(gw)
    chunks = list(
        client(gw, token(["ml-platform"])).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == RESPONSE_TOKENS
    assert sidecar_streams(gw) == before
    counted_once_more(gw, tokens_before)


def test_what_envoy_cannot_do_alone_takes_the_strict_path(gw: Gateway) -> None:
    """A stream without a usage report (the sidecar asks the backend for one and strips it), a
    model whose name is rewritten, and a team with limits all go through the sidecar."""
    ml = client(gw, token(["ml-platform"]))
    before = sidecar_streams(gw)
    chunks = list(
        ml.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)  # the client did not ask for it
    assert sidecar_streams(gw) > before

    before = sidecar_streams(gw)
    raw = ml.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-aigw-provider-model"] == "fake-gpt-4o"
    assert sidecar_streams(gw) > before

    before = sidecar_streams(gw)
    raw = client(gw, token(["search"])).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-aigw-team"] == "search"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"  # reserved before the call
    assert sidecar_streams(gw) > before


def test_the_first_matching_rule_names_the_team_in_envoy_too(gw: Gateway) -> None:
    """A member of both groups is in `search` (the first rule): Envoy's native route for `ml`
    must not take the request."""
    raw = client(gw, token(["ml-platform", "search"])).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-aigw-team"] == "search"
    assert "x-ratelimit-limit-tokens" in raw.headers


@pytest.mark.parametrize(
    ("bearer", "reason"),
    [
        (token(["ml-platform"], exp=int(time.time()) - 3600), "expired"),
        (token(["ml-platform"], key=FOREIGN_KEY), "verification"),
        (token(["ml-platform"], aud="someone-else"), "audience"),
    ],
    ids=["expired", "foreign-key", "wrong-audience"],
)
def test_a_refused_token_gets_401_in_openais_shape(gw: Gateway, bearer: str, reason: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gw, bearer).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    err = caught.value
    assert err.status_code == 401
    assert isinstance(err.body, dict) and err.body["code"] == "invalid_token"
    assert reason in err.body["message"].lower()
    challenge = err.response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="extproc", error="invalid_token"')


def test_a_valid_token_that_maps_to_no_team_gets_403(gw: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gw, token(["marketing"])).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "no_team_for_token"


def test_api_keys_work_beside_tokens(gw: Gateway) -> None:
    raw = client(gw, "sk-team-a").chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-aigw-team"] == "team-a"
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gw, "sk-not-a-key-of-anyone").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_api_key"


def test_the_bearer_scheme_may_be_lowercase(gw: Gateway) -> None:
    """RFC 7235: the scheme is case-insensitive; the sidecar takes a key's either way, and
    Envoy a token's."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{gw.base_url}/chat/completions",
        data=body.encode(),
        headers={
            "authorization": f"bearer {token(['ml-platform'])}",
            "content-type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["x-aigw-team"] == "ml"
