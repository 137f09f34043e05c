"""OpenAI's endpoints that the gateway passes to a model's backend as they are (images, speech,
transcriptions and translations, moderations, rerank), through the real Envoy with the openai
SDK: the team's key, the model's allow-list and type, request quotas and guards apply, the
backend's key and name for the model go upstream, a multipart body is kept byte for byte but for
the model's name."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from .conftest import BACKEND_A_SECRET, Gateway, running_gateway, sha256_hex

pytestmark = pytest.mark.e2e

WAV = b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24) + b"data" + bytes(4)


def with_media(config: dict) -> None:
    models = config["models"]
    models["gpt-image-1"] = {"type": "image", "targets": [{"backend": "fake-a"}]}
    models["tts-1"] = {"type": "audio", "targets": [{"backend": "fake-a"}]}
    # The second fake knows the model by another name: the multipart body's field is renamed.
    models["whisper-1"] = {
        "type": "audio",
        "targets": [{"backend": "fake-b", "model": "whisper-large-v3"}],
    }
    models["omni-moderation-latest"] = {"type": "moderation", "targets": [{"backend": "fake-a"}]}
    models["reranker"] = {"type": "rerank", "targets": [{"backend": "fake-a", "model": "bge"}]}
    models["guarded-image"] = {
        "type": "image",
        "targets": [{"backend": "fake-a", "model": "gpt-image-1"}],
        "guardrails": {"request": ["no-secrets"]},
    }
    config.setdefault("guards", {})["no-secrets"] = {"type": "deny", "keywords": ["password"]}
    config["teams"]["team-q"] = {
        "keys": [{"sha256": sha256_hex("sk-team-q")}],
        "limits": [{"window": "minute", "requests": 1, "models": ["gpt-image-1"]}],
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("passthrough"), edit=with_media) as g:
        yield g


def client(gw: Gateway, key: str = "sk-team-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def last_sent(gw: Gateway, fake: str) -> dict:
    return gw.fake_requests(fake)[-1]


def test_an_image_is_generated_by_the_models_backend(gw: Gateway) -> None:
    image = client(gw).images.generate(model="gpt-image-1", prompt="a lighthouse at dusk")
    assert image.data and image.data[0].b64_json
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG")
    sent = last_sent(gw, gw.fake_a)
    assert sent["path"] == "/v1/images/generations"
    assert sent["body"]["prompt"] == "a lighthouse at dusk"
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"


def test_speech_comes_back_as_audio(gw: Gateway) -> None:
    with client(gw).audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Hello there."
    ) as speech:
        audio = speech.read()
        assert speech.headers["content-type"].startswith("audio/")
    assert audio
    assert last_sent(gw, gw.fake_a)["path"] == "/v1/audio/speech"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the SDK's translations)
@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_a_transcription_keeps_its_file_and_renames_the_model(gw: Gateway, kind: str) -> None:
    audio = client(gw).audio
    endpoint = audio.transcriptions if kind == "transcriptions" else audio.translations
    result = endpoint.create(model="whisper-1", file=("hello.wav", WAV, "audio/wav"))
    assert result.text
    sent = last_sent(gw, gw.fake_b)
    assert sent["path"] == f"/v1/audio/{kind}"
    assert "whisper-large-v3" in json.dumps(sent["body"])


def test_moderations_default_to_openais_model(gw: Gateway) -> None:
    result = client(gw).moderations.create(input="I like turtles")
    assert result.results
    sent = last_sent(gw, gw.fake_a)
    # Routed by OpenAI's default model; the body goes as it is (the backend's default too).
    assert sent["path"] == "/v1/moderations" and "model" not in sent["body"]


def post(gw: Gateway, path: str, body: dict, key: str = "sk-team-a") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{gw.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_rerank_goes_to_the_backend_under_its_name(gw: Gateway) -> None:
    status, answer = post(
        gw,
        "/rerank",
        {"model": "reranker", "query": "turtles", "documents": ["cats", "sea turtles"]},
    )
    assert status == 200 and answer["results"][0]["index"] == 1
    assert last_sent(gw, gw.fake_a)["body"]["model"] == "bge"


def test_a_reranks_reported_total_is_its_input(gw: Gateway) -> None:
    request = urllib.request.Request(
        f"{gw.base_url}/rerank",
        data=json.dumps({"model": "reranker", "query": "q", "documents": ["a b", "c"]}).encode(),
        headers={"authorization": "Bearer sk-team-a", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request) as resp:
        answer = json.load(resp)
        headers = resp.headers
    total = answer["usage"]["total_tokens"]
    assert total > 0
    assert headers["x-aigw-prompt-tokens"] == headers["x-aigw-total-tokens"] == str(total)
    assert headers["x-aigw-token-source"] == "provider"


def test_a_chat_model_is_not_an_image_model(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).images.generate(model="gpt-4o-mini", prompt="a lighthouse")
    assert info.value.body["code"] == "model_not_supported"  # type: ignore[index]


def test_a_request_quota_counts_passed_requests(gw: Gateway) -> None:
    limited = client(gw, key="sk-team-q")
    limited.images.generate(model="gpt-image-1", prompt="one")
    with pytest.raises(openai.RateLimitError):
        limited.images.generate(model="gpt-image-1", prompt="two")


def test_request_guards_read_an_image_prompt(gw: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        client(gw).images.generate(model="guarded-image", prompt="draw my password")


def test_a_transcription_without_a_file_is_refused(gw: Gateway) -> None:
    boundary = "x0x0x0"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        f"{gw.base_url}/audio/transcriptions",
        data=body,
        headers={
            "authorization": "Bearer sk-team-a",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 400
    assert json.load(info.value)["error"]["param"] == "file"
