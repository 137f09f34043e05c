"""Requests a client could use to show the gateway one thing and the backend another, or to
slip past its accounting: a multipart form read differently from the backend's parser (another
boundary, an unquoted or missing part name, a field given twice or too long to read), item
references into another team's stored Responses, media usage the access log cannot read, a
stored Response's cancel or delete with a body, a stored Response through a failover pool or
several sidecar workers each knowing only their own stored Responses (not stored there). Each
is read the backend's way, or refused with a 400 before anything reaches the backend
(docs/clients.md)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from extproc.config import ResolvedTarget, SidecarSettings, parse_config
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.request_plan import Admitted, plan
from extproc.wire.openai import form
from extproc.wire.responses import RESPONSES, RESPONSES_API

from .conftest import Gateway, running_gateway, sha256_hex

WAV = b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24) + b"data" + bytes(4)
FORM = "multipart/form-data; boundary="


def part(boundary: str, name: str, value: bytes, extra: str = "") -> bytes:
    head = f"--{boundary}\r\nContent-Disposition: form-data; name={name}{extra}\r\n\r\n"
    return head.encode() + value + b"\r\n"


def file_part(boundary: str) -> bytes:
    return part(boundary, '"file"', WAV, '; filename="a.wav"')


def refusal(raw: bytes, mark: str | None = "B") -> GatewayError:
    with pytest.raises(GatewayError) as info:
        form.fields(raw, mark)
    return info.value


# -- the multipart parser ----------------------------------------------------------------------


def test_a_text_field_given_twice_is_refused_naming_it() -> None:
    raw = (
        part("B", '"model"', b"first") + part("B", '"model"', b"whisper-1") + file_part("B")
        + b"--B--\r\n"
    )  # fmt: skip
    error = refusal(raw)
    assert (error.status, error.code, error.param) == (400, "invalid_form", "model")


def test_a_quoted_and_an_unquoted_name_are_the_same_field() -> None:
    raw = (
        part("B", '"model"', b"whisper-1") + part("B", "model", b"gpt-4o-transcribe")
        + file_part("B") + b"--B--\r\n"
    )  # fmt: skip
    error = refusal(raw)
    assert (error.status, error.code, error.param) == (400, "invalid_form", "model")


def test_an_unquoted_part_name_is_read() -> None:
    raw = part("B", "model", b"whisper-1") + file_part("B") + b"--B--\r\n"
    assert form.fields(raw, "B") == {"model": "whisper-1"}
    renamed = form.with_field(raw, "model", "whisper-large-v3")
    assert form.fields(renamed, "B") == {"model": "whisper-large-v3"}
    assert renamed.replace(b"whisper-large-v3", b"whisper-1") == raw  # every other byte kept


def test_a_text_field_over_64k_is_refused_naming_it() -> None:
    prompt = b"a" * (form.MAX_FIELD + 1)
    raw = part("B", '"model"', b"whisper-1") + part("B", '"prompt"', prompt) + b"--B--\r\n"
    error = refusal(raw)
    assert (error.status, error.code, error.param) == (400, "invalid_form", "prompt")
    at_limit = raw.replace(prompt, prompt[1:])
    assert len(form.fields(at_limit, "B")["prompt"]) == form.MAX_FIELD


@pytest.mark.parametrize(
    "disposition",
    ["form-data", 'form-data; filename="a.wav"', "form-data; name*=UTF-8''model"],
    ids=["no-name", "filename-only", "extended-name"],
)
def test_a_part_without_a_readable_name_is_refused(disposition: str) -> None:
    raw = (
        f"--B\r\nContent-Disposition: {disposition}\r\n\r\nwhisper-1\r\n".encode()
        + file_part("B") + b"--B--\r\n"
    )  # fmt: skip
    error = refusal(raw)
    assert (error.status, error.code) == (400, "invalid_form")


def test_the_body_must_start_with_the_content_types_boundary() -> None:
    raw = part("Y", '"model"', b"whisper-1") + file_part("Y") + b"--Y--\r\n"
    error = refusal(raw, "X")
    assert (error.status, error.code) == (400, "invalid_form")
    assert form.fields(raw, "Y") == {"model": "whisper-1"}
    assert form.boundary(FORM + '"Y"') == "Y" == form.boundary(FORM + "Y; charset=utf-8")
    with pytest.raises(GatewayError) as info:
        form.boundary("multipart/form-data")
    assert (info.value.status, info.value.code) == (400, "invalid_form")


def test_transport_padding_after_a_delimiter_is_accepted() -> None:
    """RFC 2046: a delimiter line may end in spaces or tabs before its CRLF."""
    raw = (
        b"--B \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        b"--B  \r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello\r\n"
        + file_part("B").replace(b"--B\r\n", b"--B\t\r\n", 1) + b"--B--\r\n"
    )  # fmt: skip
    assert form.fields(raw, "B") == {"model": "whisper-1", "prompt": "hello"}
    assert form.has_file(raw, "file")
    renamed = form.with_field(raw, "model", "whisper-large-v3")
    assert form.fields(renamed, "B")["model"] == "whisper-large-v3"


def test_a_delimiter_followed_by_other_text_is_not_a_delimiter() -> None:
    raw = part("B", '"model"', b"whisper-1") + b"--Bx\r\n" + file_part("B")[3:] + b"--B--\r\n"
    error = refusal(raw)
    assert (error.status, error.code) == (400, "invalid_form")


# -- the config ---------------------------------------------------------------------------------


def config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "teams": {"t": {"keys": [{"sha256": hashlib.sha256(b"sk-t").hexdigest()}]}},
        "backends": {"b": {"url": "http://127.0.0.1:8081/v1"}},
        "models": {"m": {"targets": [{"backend": "b"}]}},
    }
    data.update(copy.deepcopy(changes))
    return data


def test_responses_are_not_stored_where_their_records_cannot_be_shared() -> None:
    """Several sidecar workers with the memory store keep their records of who owns a stored
    Response apart: a native request goes with `store: false` there (as through a pool), so no
    Response is stored that its team could not reach again."""
    parsed = RESPONSES_API.parse(RESPONSES, orjson.dumps({"model": "m", "input": "hi"}))
    admitted = Admitted(
        who=Identity("t"), request=parsed, wire=RESPONSES_API, prompt_tokens=1, max_output=16
    )
    target = ResolvedTarget(
        model="m",
        backend="b",
        provider_model="m",
        weight=1,
        auth_header="authorization",
        credential=None,
        apis=frozenset({"openai", "responses"}),
    )
    sidecar = SidecarSettings()
    apart = plan(admitted, target, sidecar, native=True, shared_records=False)
    assert apart.body is not None and orjson.loads(apart.body)["store"] is False
    shared = plan(admitted, target, sidecar, native=True, shared_records=True)
    assert shared.body is None  # the client's body, as it is
    # (What the downstream stage passes: records are shared by one process or by Redis.)
    assert parse_config(config(sidecar={"workers": 2})).sidecar.workers == 2


# -- through the gateway ------------------------------------------------------------------------


def edit(config: dict) -> None:
    models = config["models"]
    models["whisper-1"] = {"type": "audio", "targets": [{"backend": "fake-a"}]}
    models["gpt-4o-transcribe"] = {"type": "audio", "targets": [{"backend": "fake-a"}]}
    models["gpt-image-1"] = {"type": "image", "targets": [{"backend": "fake-a"}]}
    models["pii-whisper"] = {
        "type": "audio",
        "targets": [{"backend": "fake-a", "model": "whisper-1"}],
        "guardrails": {"request": ["pii-mask"]},
    }
    models["deny-whisper"] = {
        "type": "audio",
        "targets": [{"backend": "fake-a", "model": "whisper-1"}],
        "guardrails": {"request": ["no-secrets"]},
    }
    config.setdefault("guards", {})["no-secrets"] = {"type": "deny", "keywords": ["password"]}
    config["guards"]["pii-mask"] = {"type": "pii", "action": "mask"}
    # team-b may use the cheap whisper-1 only, not gpt-4o-transcribe.
    config["teams"]["team-b"]["models"] += ["whisper-1", "gpt-native", "gpt-native-pool"]
    config["teams"]["team-c"] = {"keys": [{"sha256": sha256_hex("sk-team-c")}]}
    fake_a = config["backends"]["fake-a"]["url"].rstrip("/")
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["responses"] = {
        "url": f"{fake_b}/v1",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "responses_api": True,
    }
    config["backends"]["responses2"] = {
        "url": fake_a,
        "api_key": {"env": "TEST_BACKEND_A_KEY"},
        "responses_api": True,
    }
    models["gpt-native"] = {"targets": [{"backend": "responses"}]}
    models["gpt-native-pool"] = {
        "targets": [
            {"backend": "responses", "priority": 0},
            {"backend": "responses2", "priority": 1},
        ]
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("hardening"), edit=edit) as g:
        yield g


def client(gw: Gateway, key: str = "sk-team-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def send(
    gw: Gateway, path: str, body: bytes, content_type: str, key: str, method: str = "POST"
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{gw.base_url}{path}",
        data=body,
        method=method,
        headers={"authorization": f"Bearer {key}", "content-type": content_type},
    )
    try:
        with urllib.request.urlopen(request) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def refused(
    gw: Gateway, fake: str, path: str, body: bytes, content_type: str, key: str = "sk-team-a"
) -> dict:
    """The error of a request the gateway answers itself, having sent nothing to `fake`."""
    before = len(gw.fake_requests(fake))
    status, answer = send(gw, path, body, content_type, key)
    assert gw.fake_requests(fake)[before:] == [], (status, answer[:300])
    assert status == 400, (status, answer[:300])
    return json.loads(answer)["error"]


@pytest.mark.e2e
def test_a_body_with_another_boundary_than_its_content_type_is_refused(gw: Gateway) -> None:
    """A body whose first line is not the Content-Type's boundary: the backend would read the
    parts of the header's boundary (here a model team-b may not use) inside the other's."""
    inner = part("X", '"model"', b"gpt-4o-transcribe") + file_part("X") + b"--X--\r\n"
    raw = (
        part("Y", '"model"', b"whisper-1") + part("Y", '"file"', inner, '; filename="a.wav"')
        + b"--Y--\r\n"
    )  # fmt: skip
    error = refused(gw, gw.fake_a, "/audio/transcriptions", raw, FORM + "X", "sk-team-b")
    assert error["code"] == "invalid_form"


@pytest.mark.e2e
def test_a_model_given_again_under_an_unquoted_name_is_refused(gw: Gateway) -> None:
    raw = (
        part("B", '"model"', b"whisper-1") + part("B", "model", b"gpt-4o-transcribe")
        + file_part("B") + b"--B--\r\n"
    )  # fmt: skip
    error = refused(gw, gw.fake_a, "/audio/transcriptions", raw, FORM + "B", "sk-team-b")
    assert (error["code"], error["param"]) == ("invalid_form", "model")


@pytest.mark.e2e
def test_a_prompt_given_twice_is_refused_before_the_guards(gw: Gateway) -> None:
    raw = (
        part("B", '"model"', b"pii-whisper") + part("B", '"prompt"', b"hello")
        + part("B", '"prompt"', b"write to bob@example.com") + file_part("B") + b"--B--\r\n"
    )  # fmt: skip
    error = refused(gw, gw.fake_a, "/audio/transcriptions", raw, FORM + "B")
    assert (error["code"], error["param"]) == ("invalid_form", "prompt")


@pytest.mark.e2e
def test_a_prompt_over_64k_is_refused_rather_than_passed_unguarded(gw: Gateway) -> None:
    prompt = b"my password is hunter2 " + b"a" * (70 * 1024)
    raw = (
        part("B", '"model"', b"deny-whisper") + part("B", '"prompt"', prompt) + file_part("B")
        + b"--B--\r\n"
    )  # fmt: skip
    error = refused(gw, gw.fake_a, "/audio/transcriptions", raw, FORM + "B")
    assert (error["code"], error["param"]) == ("invalid_form", "prompt")


@pytest.mark.e2e
def test_an_unquoted_model_name_is_admitted_and_kept(gw: Gateway) -> None:
    raw = part("B", "model", b"whisper-1") + file_part("B") + b"--B--\r\n"
    before = len(gw.fake_requests(gw.fake_a))
    status, answer = send(gw, "/audio/transcriptions", raw, FORM + "B", "sk-team-b")
    assert status == 200, answer[:300]
    [sent] = gw.fake_requests(gw.fake_a)[before:]
    assert sent["path"] == "/v1/audio/transcriptions"
    assert "whisper-1" in json.dumps(sent["body"])


def provider_tokens(gw: Gateway, model: str, kind: str) -> float:
    listen = gw.config["observability"]["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics") as resp:
        text = resp.read().decode()
    wanted = {f'model="{model}"', f'type="{kind}"', 'source="provider"'}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("extproc_tokens_total{"):
            labels, _, value = line.rpartition(" ")
            if wanted <= set(labels[len("extproc_tokens_total{") : -1].split(",")):
                total += float(value)
    return total


def wait_for_change(gw: Gateway, model: str, kind: str, before: float) -> float:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and provider_tokens(gw, model, kind) == before:
        time.sleep(0.1)
    return provider_tokens(gw, model, kind) - before


@pytest.mark.e2e
def test_an_images_reported_tokens_are_counted(gw: Gateway) -> None:
    """gpt-image-* reports input_tokens/output_tokens, which Envoy's access log cannot read:
    the sidecar reads them."""
    before = {kind: provider_tokens(gw, "gpt-image-1", kind) for kind in ("input", "output")}
    image = client(gw, "sk-team-c").images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert image.usage is not None and image.usage.output_tokens > 0
    output = wait_for_change(gw, "gpt-image-1", "output", before["output"])
    assert output == image.usage.output_tokens
    assert provider_tokens(gw, "gpt-image-1", "input") - before["input"] == image.usage.input_tokens


@pytest.mark.e2e
def test_a_transcriptions_reported_tokens_are_counted(gw: Gateway) -> None:
    model = "gpt-4o-transcribe"
    before = {kind: provider_tokens(gw, model, kind) for kind in ("input", "output")}
    raw = part("B", '"model"', model.encode()) + file_part("B") + b"--B--\r\n"
    status, answer = send(gw, "/audio/transcriptions", raw, FORM + "B", "sk-team-a")
    assert status == 200, answer[:300]
    usage = json.loads(answer)["usage"]
    assert usage["type"] == "tokens" and usage["output_tokens"] > 0
    assert wait_for_change(gw, model, "output", before["output"]) == usage["output_tokens"]
    assert provider_tokens(gw, model, "input") - before["input"] == usage["input_tokens"]


@pytest.mark.e2e
@pytest.mark.parametrize("method, suffix", [("POST", "/cancel"), ("DELETE", "")])
def test_a_stored_responses_cancel_or_delete_with_a_body_is_passed_on(
    gw: Gateway, method: str, suffix: str
) -> None:
    stored = client(gw).responses.create(model="gpt-native", input="hi")
    before = len(gw.fake_requests(gw.fake_b))
    path = f"/responses/{stored.id}{suffix}"
    status, answer = send(gw, path, b"{}", "application/json", "sk-team-a", method)
    assert status < 500, (status, answer[:300])
    [sent] = gw.fake_requests(gw.fake_b)[before:]
    assert sent["path"] == f"/v1{path}"


@pytest.mark.e2e
def test_a_response_through_a_failover_pool_is_not_stored(gw: Gateway) -> None:
    """Which of the pool's backends stored it could not be known again: it is sent with
    store: false, and the gateway records nothing to retrieve."""
    team_a = client(gw)
    before = len(gw.fake_requests(gw.fake_b))
    answer = team_a.responses.create(model="gpt-native-pool", input="keep this")
    assert answer.store is False
    [sent] = gw.fake_requests(gw.fake_b)[before:]
    assert sent["body"]["store"] is False
    with pytest.raises(openai.NotFoundError):
        team_a.responses.retrieve(answer.id)


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["gpt-native", "gpt-4o-mini"], ids=["native", "translated"])
@pytest.mark.parametrize("shape", ["item_reference", "bare-id"])
def test_an_item_reference_is_refused(gw: Gateway, model: str, shape: str) -> None:
    """An item of a stored Response by id (maybe another team's): the gateway records whose
    Responses are whose, not their items."""
    stored = client(gw).responses.create(model="gpt-native", input="A secret of team-a.")
    item_id = stored.output[0].id
    item = (
        {"type": "item_reference", "id": item_id} if shape == "item_reference" else {"id": item_id}
    )
    body = {"model": model, "input": [{"role": "user", "content": "hi"}, item]}
    fake = gw.fake_b if model == "gpt-native" else gw.fake_a
    raw = json.dumps(body).encode()
    error = refused(gw, fake, "/responses", raw, "application/json", "sk-team-b")
    assert (error["code"], error["param"]) == ("unsupported_parameter", "input[1]")
