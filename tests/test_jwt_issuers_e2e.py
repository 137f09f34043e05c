"""JWT identities through the real Envoy: ES256 tokens, several issuers at once, and the
rotation of an issuer's signing keys.

One gateway serves four issuers, each with its own EC P-256 keys (ES256) and its own rules:

- `corp`: its JWKS served on loopback and fetched by Envoy (`jwks.uri`, `cache_s` default);
  its `groups` claim names team `search` (limits: the strict path) or `ml` (the native path);
- `partner`: its JWKS in a file (`jwks.file`); its nested claim `org.name` names team
  `partner` (the native path);
- `rotating`: its JWKS served on loopback by a server whose key set the tests change, with
  `cache_s: 1`; its tokens are team `platform`'s;
- `slow`: like `rotating`, with `cache_s: 7`, only to see when Envoy fetches it.

What an operator should expect of a key rotation with `jwks.uri` (Envoy 1.40's jwt_authn, as
its source reads: source/extensions/filters/http/jwt_authn/jwks_async_fetcher.cc,
jwks_cache.cc, authenticator.cc, and filters/http/common/jwks_fetcher.cc; the tests below check
each point against the running Envoy):

- The gateway renders `remote_jwks` with `async_fetch`: Envoy fetches the JWKS when it starts,
  then again on a timer of its main thread, with or without traffic: every `cache_s - 5` s
  when `cache_s` is above 5 s (so that the set is renewed before it would expire), every
  `cache_s` otherwise (whole seconds, at least 1: Envoy cuts a fraction, and below 1 s would
  fetch in a loop). The fetched set is then used until the next good fetch.
- Envoy does NOT fetch the set again when a token names a `kid` it does not hold: such a token
  is refused (401 `invalid_token`, "Jwks doesn't have key to match kid or alg from Jwt"). A
  provider's new key is accepted from the next timed fetch on: up to `cache_s - 5` s after it
  is published (595 s, about ten minutes, with the default `cache_s: 600`). Publish a new key
  at least that long before signing with it (identity providers publish ahead of use).
- A failed fetch (the provider down, a status other than 200, an empty body, or a document
  that is not a usable JWKS, an empty key set included) changes nothing: the last good keys
  keep verifying, and Envoy tries again 1 s later (`failed_refetch_duration`'s default).
- A key removed from the set stops verifying tokens at the next timed fetch (the same delay),
  tokens Envoy saw before included: the gateway leaves Envoy's cache of verified tokens
  (`jwt_cache_config`) off, since a cached token's signature is not checked again.
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import jwt
import openai
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extproc.config import JwksSource

from .conftest import Gateway, QuietHandler, running_gateway, serving
from .test_identity_e2e import sidecar_streams

pytestmark = pytest.mark.e2e

AUDIENCE = "extproc"
MODEL = "gpt-4o-mini"  # one backend (fake-a) under its own name: native for a team without limits
ROTATION_CACHE_S = 1
DEADLINE_S = 15.0  # a key change must be seen within this (Envoy refetches every second here)


@dataclass(frozen=True)
class Key:
    """An EC P-256 signing key and the `kid` its issuer publishes it under."""

    kid: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()), repr=False
    )

    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "alg": "ES256", "use": "sig"}


@dataclass(frozen=True)
class Issuer:
    name: str  # identities.jwt.<name>
    iss: str
    key: Key


CORP = Issuer("corp", "https://login.corp.example.test/", Key("corp-es-1"))
PARTNER = Issuer("partner", "https://idp.partner.example.test/realms/acme", Key("partner-es-1"))
ROTATING = Issuer("rotating", "https://rotating.example.test/", Key("rot-1"))
SLOW = Issuer("slow", "https://slow.example.test/", Key("slow-1"))  # cache_s above 5 s
SLOW_CACHE_S = 7
FOREIGN = Key("corp-es-1")  # nobody publishes it: a forger's key under corp's kid


def jwks(*keys: Key) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def token(issuer: Issuer, key: Key | None = None, kid: str | None = None, **claims: Any) -> str:
    """A token of `issuer` (its `iss`), signed with `key` (the issuer's own by default) under
    `kid` (the key's by default). Every token is new (its own `jti`): Envoy caches the tokens
    it verified, and a test that wants a signature checked must send one it never saw."""
    key = key or issuer.key
    now = int(time.time())
    payload = {
        "iss": issuer.iss,
        "aud": AUDIENCE,
        "sub": "jane",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    payload.update(claims)
    return jwt.encode(payload, key.private, algorithm="ES256", headers={"kid": kid or key.kid})


class KeySetServer(http.server.ThreadingHTTPServer):
    """An identity provider's JWKS endpoint: the key set it serves can be changed, or made to
    fail, and it records when it was fetched."""

    def __init__(self, *keys: Key) -> None:
        super().__init__(("127.0.0.1", 0), KeySetHandler)
        self.lock = threading.Lock()
        self.status, self.document = 200, json.dumps(jwks(*keys)).encode()
        self.fetched_at: list[float] = []  # time.monotonic() of each fetch

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/.well-known/jwks.json"

    @property
    def fetches(self) -> int:
        with self.lock:
            return len(self.fetched_at)

    def publish(self, *keys: Key) -> None:
        self.answer(200, json.dumps(jwks(*keys)).encode())

    def answer(self, status: int, body: bytes) -> None:
        """Serve this instead of a key set (an outage, a broken document)."""
        with self.lock:
            self.status, self.document = status, body


class KeySetHandler(QuietHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, KeySetServer)
        with server.lock:
            server.fetched_at.append(time.monotonic())
            status, body = server.status, server.document
        self.reply(status, body)


@pytest.fixture(scope="module")
def corp_jwks() -> Iterator[KeySetServer]:
    yield from serving(KeySetServer(CORP.key))


@pytest.fixture(scope="module")
def rotating_jwks() -> Iterator[KeySetServer]:
    yield from serving(KeySetServer(ROTATING.key))


@pytest.fixture(scope="module")
def slow_jwks() -> Iterator[KeySetServer]:
    yield from serving(KeySetServer(SLOW.key))


def with_issuers(
    corp_uri: str, partner_file: Path, rotating_uri: str, slow_uri: str
) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["teams"]["ml"] = {}
        config["teams"]["search"] = {
            "limits": [{"name": "daily", "window": "day", "tokens": 1_000_000}]
        }
        config["teams"]["partner"] = {}
        config["teams"]["platform"] = {}
        config["identities"] = {
            "jwt": {
                CORP.name: {
                    "issuer": CORP.iss,
                    "audiences": [AUDIENCE],
                    "jwks": {"uri": corp_uri},
                    "teams": [
                        {"claim": "groups", "value": "search", "team": "search"},
                        {"claim": "groups", "value": "ml-platform", "team": "ml"},
                    ],
                },
                PARTNER.name: {
                    "issuer": PARTNER.iss,
                    "audiences": [AUDIENCE],
                    "jwks": {"file": str(partner_file)},
                    "teams": [{"claim": ["org", "name"], "value": "acme", "team": "partner"}],
                },
                ROTATING.name: {
                    "issuer": ROTATING.iss,
                    "audiences": [AUDIENCE],
                    "jwks": {"uri": rotating_uri, "cache_s": ROTATION_CACHE_S},
                    "teams": [{"claim": "groups", "value": "platform", "team": "platform"}],
                },
                SLOW.name: {
                    "issuer": SLOW.iss,
                    "jwks": {"uri": slow_uri, "cache_s": SLOW_CACHE_S},
                    "teams": [{"claim": "groups", "value": "platform", "team": "platform"}],
                },
            }
        }

    return edit


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    corp_jwks: KeySetServer,
    rotating_jwks: KeySetServer,
    slow_jwks: KeySetServer,
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("jwt-issuers")
    partner_file = tmp / "partner-jwks.json"
    partner_file.write_text(json.dumps(jwks(PARTNER.key)))
    edit = with_issuers(corp_jwks.uri, partner_file, rotating_jwks.uri, slow_jwks.uri)
    with running_gateway(tmp, edit=edit) as gateway:
        yield gateway


# -- helpers ------------------------------------------------------------------------------------


def client(gw: Gateway, bearer: str, http_client: httpx2.Client | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.base_url, api_key=bearer, max_retries=0, http_client=http_client
    )


def ask(gw: Gateway, bearer: str, http_client: httpx2.Client | None = None) -> Any:
    """The raw answer to a small chat request (the openai SDK's), served as some team."""
    return client(gw, bearer, http_client).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )


def status_of(gw: Gateway, bearer: str, http_client: httpx2.Client | None = None) -> int:
    try:
        return ask(gw, bearer, http_client).status_code
    except openai.APIStatusError as exc:
        return exc.status_code


def refusal(gw: Gateway, bearer: str) -> openai.AuthenticationError:
    """The 401 a refused token gets, checked to be in OpenAI's shape with RFC 6750's challenge."""
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(gw, bearer)
    err = caught.value
    assert err.status_code == 401
    assert isinstance(err.body, dict) and err.body["code"] == "invalid_token", err.body
    challenge = err.response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="extproc", error="invalid_token"'), challenge
    return err


def wait_for(
    gw: Gateway, make_token: Callable[[], str], status: int, timeout: float = DEADLINE_S
) -> float:
    """Seconds until a request with a token of `make_token` (a new one on each try) gets
    `status`; fails after `timeout`, naming the statuses seen."""
    start = time.monotonic()
    seen: list[int] = []
    while True:
        seen.append(status_of(gw, make_token()))
        if seen[-1] == status:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"no {status} in {timeout}s: {seen[-5:]}"
        time.sleep(0.1)


def fetched_after(server: KeySetServer, moment: float) -> int:
    with server.lock:
        return sum(1 for t in server.fetched_at if t > moment)


# -- ES256 --------------------------------------------------------------------------------------


def test_an_es256_token_is_verified_by_envoy_and_served_as_its_team(gw: Gateway) -> None:
    raw = ask(gw, token(CORP, groups=["search"]))
    assert raw.status_code == 200
    assert raw.headers["x-aigw-team"] == "search"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"  # the strict path: reserved

    before = sidecar_streams(gw)
    raw = ask(gw, token(CORP, groups=["ml-platform"]))
    assert raw.headers["x-aigw-team"] == "ml" and raw.headers["x-aigw-backend"] == "fake-a"
    assert sidecar_streams(gw) == before  # Envoy verified ES256 and served it on its own


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        # A forger's EC key under corp's own kid: the signature check fails.
        (lambda: token(CORP, key=FOREIGN, groups=["search"]), "verification fails"),
        # A kid corp never published: refused without fetching the set again.
        (lambda: token(CORP, key=Key("corp-es-2"), groups=["search"]), "kid"),
        # The right key, but a signature of another curve's algorithm (ES384 under an ES256 kid).
        (
            lambda: jwt.encode(
                {"iss": CORP.iss, "aud": AUDIENCE, "exp": int(time.time()) + 600},
                ec.generate_private_key(ec.SECP384R1()),
                algorithm="ES384",
                headers={"kid": CORP.key.kid},
            ),
            "kid or alg",
        ),
    ],
    ids=["foreign-ec-key", "unknown-kid", "es384-under-es256-kid"],
)
def test_an_es256_token_envoy_cannot_verify_gets_401(
    gw: Gateway, corp_jwks: KeySetServer, make: Callable[[], str], reason: str
) -> None:
    fetches = corp_jwks.fetches
    err = refusal(gw, make())
    message = err.body["message"].lower()  # type: ignore[index]
    assert reason in message, message
    # The reason is corp's (the issuer the token claims), not another issuer's "not configured".
    assert "not configured" not in message, message
    assert corp_jwks.fetches == fetches  # no fetch on an unknown kid, nor on a failed signature


# -- several issuers ----------------------------------------------------------------------------


def test_each_issuers_token_is_served_as_the_team_of_its_own_rules(gw: Gateway) -> None:
    assert ask(gw, token(CORP, groups=["search"])).headers["x-aigw-team"] == "search"
    assert ask(gw, token(PARTNER, org={"name": "acme"})).headers["x-aigw-team"] == "partner"
    assert ask(gw, token(ROTATING, groups=["platform"])).headers["x-aigw-team"] == "platform"


def test_a_nested_claim_of_a_file_jwks_issuer_takes_the_native_path(gw: Gateway) -> None:
    before = sidecar_streams(gw)
    raw = ask(gw, token(PARTNER, org={"name": "acme", "id": 7}))
    assert raw.headers["x-aigw-team"] == "partner" and raw.headers["x-aigw-backend"] == "fake-a"
    assert sidecar_streams(gw) == before


def test_an_issuers_rules_apply_to_its_own_tokens_only(gw: Gateway) -> None:
    """`groups: [search]` names team search in a corp token, nothing in a partner one: each
    issuer's claims are read with its own rules."""
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ask(gw, token(PARTNER, groups=["search", "ml-platform", "platform"]))
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "no_team_for_token"
    with pytest.raises(openai.PermissionDeniedError):
        ask(gw, token(CORP, org={"name": "acme"}))


@pytest.mark.parametrize(
    ("kid", "reason"),
    [(PARTNER.key.kid, "kid"), (CORP.key.kid, "verification fails")],
    ids=["partners-kid", "corps-kid"],
)
def test_a_token_claiming_one_issuer_signed_with_anothers_key_gets_401(
    gw: Gateway, kid: str, reason: str
) -> None:
    """A token of corp's `iss` signed with partner's key (which Envoy trusts, for partner's
    tokens): refused whichever kid it names."""
    err = refusal(gw, token(CORP, key=PARTNER.key, kid=kid, groups=["search"]))
    message = err.body["message"].lower()  # type: ignore[index]
    assert reason in message and "not configured" not in message, message
    # And the other way round.
    refusal(gw, token(PARTNER, key=CORP.key, kid=PARTNER.key.kid, org={"name": "acme"}))


def test_a_token_of_an_issuer_nobody_configured_gets_401(gw: Gateway) -> None:
    stranger = Issuer("stranger", "https://elsewhere.example.test/", CORP.key)
    err = refusal(gw, token(stranger, groups=["search"]))
    assert "issuer" in err.body["message"].lower()  # type: ignore[index]


def test_api_keys_work_beside_several_issuers(gw: Gateway) -> None:
    assert ask(gw, "sk-team-a").headers["x-aigw-team"] == "team-a"
    assert ask(gw, "sk-team-b").headers["x-aigw-team"] == "team-b"
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(gw, "sk-not-a-key-of-anyone")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_api_key"


# -- rotation -----------------------------------------------------------------------------------


def rotating_token(key: Key) -> Callable[[], str]:
    return lambda: token(ROTATING, key=key, groups=["platform"])


def fetch_gaps(server: KeySetServer, after: float) -> list[float]:
    with server.lock:
        times = [t for t in server.fetched_at if t > after]
    return [b - a for a, b in itertools.pairwise(times)]


def test_envoy_refetches_the_jwks_on_a_timer_without_requests(
    gw: Gateway, rotating_jwks: KeySetServer, slow_jwks: KeySetServer
) -> None:
    """async_fetch's timer: every cache_s when it is 5 s or less, every cache_s - 5 s above
    (so a new key is seen at most that long after it is published)."""
    start = time.monotonic()
    slow_period = SLOW_CACHE_S - 5
    deadline = start + 3 * slow_period + 2
    while len(fetch_gaps(rotating_jwks, start)) < 2 or len(fetch_gaps(slow_jwks, start)) < 1:
        assert time.monotonic() < deadline, (rotating_jwks.fetched_at, slow_jwks.fetched_at)
        time.sleep(0.05)
    gaps = fetch_gaps(rotating_jwks, start)
    assert all(0.7 * ROTATION_CACHE_S < g < 1.5 * ROTATION_CACHE_S for g in gaps), gaps
    gaps = fetch_gaps(slow_jwks, start)
    assert all(0.8 * slow_period < g < 1.3 * slow_period for g in gaps), gaps


def test_a_new_key_is_accepted_after_the_next_refresh(
    gw: Gateway, rotating_jwks: KeySetServer
) -> None:
    old, new = ROTATING.key, Key("rot-2")
    rotating_jwks.publish(old)
    wait_for(gw, rotating_token(old), 200)
    assert status_of(gw, rotating_token(new)()) == 401  # not published yet

    published = time.monotonic()
    rotating_jwks.publish(old, new)
    waited = wait_for(gw, rotating_token(new), 200)
    assert fetched_after(rotating_jwks, published) >= 1
    assert waited < 2 * ROTATION_CACHE_S + 2, waited  # the next timed fetch, not a later one
    assert status_of(gw, rotating_token(old)()) == 200  # both keys verify during the overlap


def test_a_removed_key_stops_verifying_new_tokens_after_the_next_refresh(
    gw: Gateway, rotating_jwks: KeySetServer
) -> None:
    old, new = Key("rot-3"), Key("rot-4")
    rotating_jwks.publish(old, new)
    wait_for(gw, rotating_token(old), 200)
    wait_for(gw, rotating_token(new), 200)

    rotating_jwks.publish(new)
    waited = wait_for(gw, rotating_token(old), 401)
    assert waited < 2 * ROTATION_CACHE_S + 2, waited
    err = refusal(gw, rotating_token(old)())
    assert "kid" in err.body["message"].lower()  # type: ignore[index]
    assert ask(gw, rotating_token(new)()).headers["x-aigw-team"] == "platform"


@pytest.mark.parametrize(
    ("status", "body"),
    [(503, b'{"error": "unavailable"}'), (200, b'{"keys": []}')],
    ids=["provider-down", "empty-key-set"],
)
def test_a_failed_refresh_keeps_the_last_good_keys(
    gw: Gateway, rotating_jwks: KeySetServer, status: int, body: bytes
) -> None:
    """A fetch that fails, or brings no usable key set, changes nothing: the keys fetched
    last keep verifying, and Envoy tries again a second later (failed_refetch_duration)."""
    key = Key("rot-5")
    rotating_jwks.publish(key)
    wait_for(gw, rotating_token(key), 200)

    failing = time.monotonic()
    rotating_jwks.answer(status, body)
    try:
        deadline = failing + 3 * ROTATION_CACHE_S + 3
        while fetched_after(rotating_jwks, failing) < 2:  # two failed fetches (1 s apart)
            assert time.monotonic() < deadline, rotating_jwks.fetched_at[-5:]
            time.sleep(0.05)
        assert ask(gw, rotating_token(key)()).headers["x-aigw-team"] == "platform"
    finally:
        rotating_jwks.publish(key)


def test_a_token_already_seen_is_refused_once_its_key_is_removed(
    gw: Gateway, rotating_jwks: KeySetServer
) -> None:
    old, new = Key("rot-6"), Key("rot-7")
    rotating_jwks.publish(old, new)
    wait_for(gw, rotating_token(old), 200)
    # One connection, so one Envoy worker (the token cache is per worker), kept open throughout.
    with httpx2.Client(limits=httpx2.Limits(keepalive_expiry=120)) as connection:
        seen = rotating_token(old)()
        assert status_of(gw, seen, connection) == 200  # verified, and now cached

        rotating_jwks.publish(new)
        wait_for(gw, rotating_token(old), 401)  # the removal was fetched: new tokens refused
        assert status_of(gw, seen, connection) == 401


def test_a_sub_second_cache_s_is_refused_at_load() -> None:
    """Envoy cuts cache_duration to whole seconds and refetches every cache_s: below 1 s it
    would fetch the provider's JWKS in a loop (8,000 fetches in 4 s, measured), so the config
    takes whole seconds from 1 on."""
    for bad in (0.5, 1.5, 0):
        with pytest.raises(pydantic.ValidationError):
            JwksSource.model_validate({"uri": "https://idp.example.test/jwks", "cache_s": bad})
    assert JwksSource.model_validate({"uri": "https://idp.example.test/jwks", "cache_s": 1})
