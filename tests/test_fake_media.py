"""The fake's media endpoints (extproc/devtools/fake_llm/media.py): OpenAI's image generation,
speech, transcription and translation driven through the official `openai` SDK (its types
parse the answers), the rerank endpoint of vLLM-compatible servers by plain HTTP (the SDK has
none), each refusal, and the fake's common plumbing (recording, faults, usage off)."""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import openai
import orjson
import pytest

from extproc.devtools.fake_llm import FakeLLMSettings

from .test_fake_llm import _http, _running

PROMPT = "a cat on a mat"  # 14 UTF-8 bytes -> 4 tokens
TRANSCRIPT = "This is a fake transcript of the audio."
TRANSLATION = "This is a fake translation of the audio."


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-media")) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0, timeout=5
    )


def post(port: int, path: str, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return _http(
        port,
        path,
        method="POST",
        body=orjson.dumps(body),
        headers={"authorization": "Bearer sk-test", "content-type": "application/json", **headers},
    )


def post_json(port: int, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    status, _, raw = post(port, path, body, **headers)
    return status, json.loads(raw)


def post_form(
    port: int,
    path: str,
    fields: list[tuple[str, str]],
    files: Sequence[tuple[str, str, bytes]] = (),
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    """A multipart/form-data POST built by hand, for the requests the SDK will not send."""
    boundary = "fake-media-boundary"
    parts = []
    for name, value in fields:
        head = f'Content-Disposition: form-data; name="{name}"'
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n{value}\r\n".encode())
    for name, filename, data in files:
        head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
        kind = "Content-Type: application/octet-stream"
        parts.append(f"--{boundary}\r\n{head}\r\n{kind}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return _http(
        port,
        path,
        method="POST",
        body=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}", **headers},
    )


def records(port: int) -> list[dict[str, Any]]:
    return json.loads(_http(port, "/_fake/requests")[2])


def wav_file(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(bytes(2 * round(rate * seconds)))
    return out.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """A PNG's size, after checking its signature, chunk CRCs and image data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind, payload = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        assert crc == zlib.crc32(kind + payload)
        chunks[kind] = payload
        offset += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color = struct.unpack_from(">IIBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def refusal(answer: Any) -> tuple[str | None, str | None]:
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]["param"], answer["error"]["code"]


# -- images ---------------------------------------------------------------------------------------


def test_dall_e_answers_urls_by_default(client: openai.OpenAI, port: int) -> None:
    answer = client.images.generate(prompt=PROMPT, n=2, size="512x512", user="u-1")
    assert answer.created > 0 and answer.usage is None
    assert [image.url for image in answer.data or []] == [
        "https://fake.invalid/img/0.png",
        "https://fake.invalid/img/1.png",
    ]
    assert all(
        image.b64_json is None and image.revised_prompt is None for image in answer.data or []
    )
    record = records(port)[-1]
    assert record["path"] == "/v1/images/generations"
    assert record["body"] == {"prompt": PROMPT, "n": 2, "size": "512x512", "user": "u-1"}


def test_dall_e_in_base64(client: openai.OpenAI) -> None:
    answer = client.images.generate(
        prompt=PROMPT, model="dall-e-2", response_format="b64_json", quality="standard"
    )
    [image] = answer.data or []
    assert image.url is None and image.b64_json is not None
    assert png_size(base64.b64decode(image.b64_json)) == (1, 1)
    three = client.images.generate(
        prompt=PROMPT, model="dall-e-3", size="1792x1024", quality="hd", style="vivid"
    )
    [image] = three.data or []
    assert image.url and image.revised_prompt and PROMPT in image.revised_prompt


def test_gpt_image_answers_base64_with_usage(client: openai.OpenAI) -> None:
    answer = client.images.generate(prompt=PROMPT, model="gpt-image-1", n=2, quality="low")
    images = answer.data or []
    assert len(images) == 2 and all(image.url is None for image in images)
    decoded = [base64.b64decode(image.b64_json or "") for image in images]
    assert [png_size(data) for data in decoded] == [(1, 1), (1, 1)]
    assert decoded[0] != decoded[1]  # colours from the prompt and the index
    assert (answer.background, answer.output_format) == ("opaque", "png")
    assert (answer.quality, answer.size) == ("low", "1024x1024")
    usage = answer.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 544, 548)
    details = usage.input_tokens_details
    assert (details.text_tokens, details.image_tokens) == (4, 0)


@pytest.mark.parametrize(
    ("output_format", "magic"),
    [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("gif", b"GIF89a"), ("svg", b"<svg")],
)
def test_gpt_image_output_formats(client: openai.OpenAI, output_format: Any, magic: bytes) -> None:
    answer = client.images.generate(
        prompt=PROMPT, model="gpt-image-1.5", output_format=output_format
    )
    [image] = answer.data or []
    assert base64.b64decode(image.b64_json or "").startswith(magic)
    assert answer.output_format == output_format


def test_a_gpt_only_parameter_chooses_gpt_image_1(client: openai.OpenAI, port: int) -> None:
    answer = client.images.generate(prompt=PROMPT, background="transparent", safety_identifier="s")
    assert answer.usage is not None and answer.background == "transparent"
    assert answer.safety_identifier == "s"
    free = client.images.generate(prompt=PROMPT, model="gpt-image-2", size="1536x864")
    assert free.size == "1536x864"
    status, _, raw = post(
        port, "/v1/images/generations", {"prompt": PROMPT, "model": "gpt-image-1"},
        **{"x-fake-no-usage": "1"},
    )  # fmt: skip
    assert status == 200 and "usage" not in json.loads(raw)


IMAGE_REFUSALS = [
    "unknown", "no-prompt", "prompt-type", "empty-prompt", "long-prompt", "n-0", "n-11",
    "dall-e-3-n", "size", "free-size", "gpt-image-1-size", "response-format",
    "gpt-response-format", "gpt-style", "gpt-quality", "dall-e-gpt-param", "transparent-jpeg",
    "stream",
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": PROMPT, "colour": "red"}, "colour", "unknown_parameter"),
        ({"model": "dall-e-2"}, "prompt", "missing_required_parameter"),
        ({"prompt": 7}, "prompt", "invalid_type"),
        ({"prompt": ""}, "prompt", "string_below_min_length"),
        ({"prompt": "x" * 1001}, "prompt", "string_above_max_length"),
        ({"prompt": PROMPT, "n": 0}, "n", "integer_below_min_value"),
        ({"prompt": PROMPT, "n": 11}, "n", "integer_above_max_value"),
        ({"prompt": PROMPT, "model": "dall-e-3", "n": 2}, "n", "integer_above_max_value"),
        ({"prompt": PROMPT, "size": "1536x1024"}, "size", "invalid_value"),
        ({"prompt": PROMPT, "model": "gpt-image-2", "size": "1000x1000"}, "size", "invalid_value"),
        ({"prompt": PROMPT, "model": "gpt-image-1", "size": "1536x864"}, "size", "invalid_value"),
        ({"prompt": PROMPT, "response_format": "png"}, "response_format", "invalid_value"),
        (
            {"prompt": PROMPT, "model": "gpt-image-1", "response_format": "b64_json"},
            "response_format",
            "unknown_parameter",
        ),
        (
            {"prompt": PROMPT, "model": "gpt-image-1", "style": "vivid"},
            "style",
            "unknown_parameter",
        ),
        ({"prompt": PROMPT, "model": "gpt-image-1", "quality": "hd"}, "quality", "invalid_value"),
        (
            {"prompt": PROMPT, "model": "dall-e-2", "output_format": "png"},
            "output_format",
            "unsupported_parameter",
        ),
        (
            {"prompt": PROMPT, "background": "transparent", "output_format": "jpeg"},
            "background",
            "invalid_value",
        ),
        (
            {"prompt": PROMPT, "model": "gpt-image-1", "stream": True},
            "stream",
            "unsupported_parameter",
        ),
    ],
    ids=IMAGE_REFUSALS,
)
def test_image_refusals(port: int, body: dict[str, Any], param: str, code: str) -> None:
    status, answer = post_json(port, "/v1/images/generations", body)
    assert status == 400, answer
    assert refusal(answer) == (param, code)


def test_the_sdk_raises_an_image_refusal(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=PROMPT, model="gpt-image-1", response_format="url")
    assert caught.value.body == {
        "message": "Unknown parameter: 'response_format'.",
        "type": "invalid_request_error",
        "param": "response_format",
        "code": "unknown_parameter",
    }


# -- speech ---------------------------------------------------------------------------------------


def test_speech_is_mp3_by_default(client: openai.OpenAI, port: int) -> None:
    speech = client.audio.speech.create(model="tts-1", input="Hello!", voice="alloy")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    audio = speech.content
    assert audio[:2] == b"\xff\xfb" and len(audio) % 104 == 0  # MPEG-1 layer III frames
    assert records(port)[-1]["body"] == {"model": "tts-1", "input": "Hello!", "voice": "alloy"}


@pytest.mark.parametrize(
    ("response_format", "content_type"),
    [
        ("opus", "audio/opus"),
        ("aac", "audio/aac"),
        ("flac", "audio/flac"),
        ("wav", "audio/wav"),
        ("pcm", "audio/pcm"),
    ],
)
def test_speech_formats(client: openai.OpenAI, response_format: Any, content_type: str) -> None:
    speech = client.audio.speech.create(
        model="gpt-4o-mini-tts",
        input="Hello!",
        voice={"id": "voice_1234"},
        instructions="Cheerful.",
        speed=1.5,
        response_format=response_format,
    )
    assert speech.response.headers["content-type"] == content_type
    audio = speech.content
    if response_format == "opus":
        assert audio[:4] == b"OggS" and audio[28:36] == b"OpusHead"
    elif response_format == "aac":
        assert audio[:2] == b"\xff\xf1"  # ADTS, MPEG-4, no CRC
    elif response_format == "flac":
        assert audio[:4] == b"fLaC"
    elif response_format == "wav":
        with wave.open(io.BytesIO(audio)) as reader:
            params = reader.getparams()
            assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 24000)
            frames = reader.readframes(params.nframes)
        assert len(audio) == 44 + len(frames) and frames == bytes(len(frames)) and frames
    else:
        assert audio == bytes(4800)  # 0.1 s of 16-bit 24 kHz silence


SPEECH_REFUSALS = [
    "no-model", "no-input", "no-voice", "long-input", "voice", "custom-voice", "speed", "format",
    "sse-tts-1", "sse", "unknown",
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "x", "voice": "alloy"}, "model", "missing_required_parameter"),
        ({"model": "tts-1", "voice": "alloy"}, "input", "missing_required_parameter"),
        ({"model": "tts-1", "input": "x"}, "voice", "missing_required_parameter"),
        (
            {"model": "tts-1", "input": "x" * 4097, "voice": "alloy"},
            "input",
            "string_above_max_length",
        ),
        ({"model": "tts-1", "input": "x", "voice": "bob"}, "voice", "invalid_value"),
        ({"model": "tts-1", "input": "x", "voice": {"name": "v"}}, "voice", "invalid_value"),
        (
            {"model": "tts-1", "input": "x", "voice": "alloy", "speed": 5},
            "speed",
            "decimal_above_max_value",
        ),
        (
            {"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "ogg"},
            "response_format",
            "invalid_value",
        ),
        (
            {"model": "tts-1", "input": "x", "voice": "alloy", "stream_format": "sse"},
            "stream_format",
            "unsupported_value",
        ),
        (
            {"model": "gpt-4o-mini-tts", "input": "x", "voice": "alloy", "stream_format": "sse"},
            "stream_format",
            "unsupported_parameter",
        ),
        (
            {"model": "tts-1", "input": "x", "voice": "alloy", "pitch": 2},
            "pitch",
            "unknown_parameter",
        ),
    ],
    ids=SPEECH_REFUSALS,
)
def test_speech_refusals(port: int, body: dict[str, Any], param: str, code: str) -> None:
    status, answer = post_json(port, "/v1/audio/speech", body)
    assert status == 400, answer
    assert refusal(answer) == (param, code)


# -- transcription and translation ----------------------------------------------------------------


def test_a_transcription_as_json(client: openai.OpenAI, port: int) -> None:
    answer = client.audio.transcriptions.create(
        file=("a.wav", wav_file(2.5)), model="whisper-1", language="en", temperature=0.2
    )
    assert answer.text == TRANSCRIPT
    assert answer.usage is not None and answer.usage.model_dump() == {
        "type": "duration",
        "seconds": 3.0,  # 2.5 s, billed by the second
    }
    record = records(port)[-1]
    assert record["path"] == "/v1/audio/transcriptions"
    form = record["body"]  # the form, the file as its name, type and size
    assert form["file"]["content_type"].startswith("audio/")  # as the SDK guessed it
    assert form == {
        "model": "whisper-1",
        "language": "en",
        "temperature": "0.2",
        "file": {"filename": "a.wav", "content_type": form["file"]["content_type"], "bytes": 80044},
    }


def test_a_transcription_as_text(client: openai.OpenAI) -> None:
    text = client.audio.transcriptions.create(
        file=("a.wav", wav_file(1)), model="whisper-1", response_format="text"
    )
    assert text == TRANSCRIPT + "\n"
    srt = client.audio.transcriptions.create(
        file=("a.wav", wav_file(1)), model="whisper-1", response_format="srt"
    )
    assert srt == f"1\n00:00:00,000 --> 00:00:01,000\n{TRANSCRIPT}\n\n"
    vtt = client.audio.transcriptions.create(
        file=("a.mp3", b"\xff\xfb" * 8000), model="whisper-1", response_format="vtt"
    )
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{TRANSCRIPT}\n\n"  # 16 kB a second


def test_gpt_4o_transcribe_reports_tokens(client: openai.OpenAI) -> None:
    answer = client.audio.transcriptions.create(
        file=("a.wav", wav_file(2)),
        model="gpt-4o-transcribe",
        prompt="Names: Ada",  # 10 bytes -> 3 tokens
        include=["logprobs"],
        chunking_strategy={"type": "server_vad", "threshold": 0.5},
    )
    assert answer.text == TRANSCRIPT
    assert [p.token for p in answer.logprobs or []] == TRANSCRIPT.split()
    assert answer.usage is not None and answer.usage.model_dump() == {
        "type": "tokens",
        "input_tokens": 23,
        "input_token_details": {"audio_tokens": 20, "text_tokens": 3},
        "output_tokens": 10,  # 39 bytes
        "total_tokens": 33,
    }
    text = client.audio.transcriptions.create(
        file=("a.wav", wav_file(1)), model="gpt-4o-mini-transcribe", response_format="text"
    )
    assert text == TRANSCRIPT + "\n"


def test_verbose_and_diarized_transcriptions(client: openai.OpenAI) -> None:
    verbose = client.audio.transcriptions.create(
        file=("a.wav", wav_file(2)),
        model="whisper-1",
        language="fr",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert (verbose.language, verbose.duration, verbose.text) == ("french", 2.0, TRANSCRIPT)
    assert [s.text for s in verbose.segments or []] == [TRANSCRIPT]
    words = verbose.words or []
    assert [w.word for w in words] == TRANSCRIPT.split() and words[-1].end == 2.0
    diarized = client.audio.transcriptions.create(
        file=("a.wav", wav_file(1)),
        model="gpt-4o-transcribe-diarize",
        response_format="diarized_json",
        chunking_strategy="auto",
    )
    assert diarized.text == TRANSCRIPT
    assert [(s.speaker, s.text) for s in diarized.segments] == [("A", TRANSCRIPT)]
    assert diarized.usage is not None and diarized.usage.type == "tokens"


def test_the_text_asked_for(client: openai.OpenAI) -> None:
    answer = client.audio.transcriptions.create(
        file=("a.wav", wav_file(1)),
        model="whisper-1",
        extra_headers={"x-fake-response-text": "Bonjour.", "x-fake-no-usage": "1"},
    )
    assert answer.text == "Bonjour." and answer.usage is None


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, for translations
def test_a_translation(client: openai.OpenAI, port: int) -> None:
    answer = client.audio.translations.create(file=("a.wav", wav_file(1)), model="whisper-1")
    assert answer.text == TRANSLATION
    assert records(port)[-1]["path"] == "/v1/audio/translations"
    text = client.audio.translations.create(
        file=("b.ogg", b"OggS" * 100), model="whisper-1", response_format="text", prompt="Hi"
    )
    assert text == TRANSLATION + "\n"
    verbose = client.audio.translations.create(
        file=("a.wav", wav_file(1)), model="whisper-1", response_format="verbose_json"
    )
    assert (verbose.language, verbose.text) == ("english", TRANSLATION)


AUDIO = [("file", "a.wav", b"RIFF0000WAVE")]


AUDIO_REFUSALS = [
    "no-file", "no-model", "translation-no-file", "translation-no-model", "file-as-text",
    "not-audio", "empty-audio", "unknown", "translation-language", "gpt-verbose",
    "whisper-diarized", "format", "granularities-without-verbose", "whisper-logprobs",
    "temperature", "language", "stream",
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fields", "files", "param", "code"),
    [
        ("transcriptions", [("model", "whisper-1")], [], "file", "missing_required_parameter"),
        ("transcriptions", [], AUDIO, "model", "missing_required_parameter"),
        ("translations", [("model", "whisper-1")], [], "file", "missing_required_parameter"),
        ("translations", [], AUDIO, "model", "missing_required_parameter"),
        (
            "transcriptions",
            [("model", "whisper-1"), ("file", "a.wav")],
            [],
            "file",
            "invalid_type",
        ),
        (
            "transcriptions",
            [("model", "whisper-1")],
            [("file", "a.txt", b"x")],
            "file",
            "invalid_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1")],
            [("file", "a.wav", b"")],
            "file",
            "audio_too_short",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("speed", "2")],
            AUDIO,
            "speed",
            "unknown_parameter",
        ),
        (
            "translations",
            [("model", "whisper-1"), ("language", "fr")],
            AUDIO,
            "language",
            "unknown_parameter",
        ),
        (
            "transcriptions",
            [("model", "gpt-4o-transcribe"), ("response_format", "verbose_json")],
            AUDIO,
            "response_format",
            "unsupported_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("response_format", "diarized_json")],
            AUDIO,
            "response_format",
            "unsupported_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("response_format", "xml")],
            AUDIO,
            "response_format",
            "invalid_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("timestamp_granularities[]", "word")],
            AUDIO,
            "timestamp_granularities",
            "invalid_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("include[]", "logprobs")],
            AUDIO,
            "include",
            "unsupported_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("temperature", "2")],
            AUDIO,
            "temperature",
            "invalid_value",
        ),
        (
            "transcriptions",
            [("model", "whisper-1"), ("language", "english")],
            AUDIO,
            "language",
            "invalid_language_format",
        ),
        (
            "transcriptions",
            [("model", "gpt-4o-transcribe"), ("stream", "true")],
            AUDIO,
            "stream",
            "unsupported_parameter",
        ),
    ],
    ids=AUDIO_REFUSALS,
)
def test_audio_refusals(
    port: int,
    path: str,
    fields: list[tuple[str, str]],
    files: list[tuple[str, str, bytes]],
    param: str,
    code: str,
) -> None:
    status, _, raw = post_form(port, f"/v1/audio/{path}", fields, files)
    assert status == 400, raw
    assert refusal(json.loads(raw)) == (param, code)


def test_a_refused_form_is_recorded(port: int) -> None:
    fields = [("model", "whisper-1"), ("include[]", "logprobs"), ("include[]", "logprobs")]
    status, _, _ = post_form(port, "/v1/audio/transcriptions", fields)
    assert status == 400
    record = records(port)[-1]
    assert record["body"] == {"model": "whisper-1", "include": ["logprobs", "logprobs"]}


def test_audio_needs_a_form(port: int) -> None:
    status, answer = post_json(port, "/v1/audio/transcriptions", {"model": "whisper-1"})
    assert status == 400 and refusal(answer) == (None, "invalid_content_type")


def test_the_sdk_raises_an_audio_refusal(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            file=("notes.txt", b"hello"), model="whisper-1", response_format="json"
        )
    assert caught.value.body is not None
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "file"


# -- rerank ---------------------------------------------------------------------------------------

DOCUMENTS = [
    "The weather today is sunny.",
    {"text": "Paris is the capital of France."},
    "France is a country in Europe; its capital is Paris.",
    "Reranking is fun!",
]


def test_rerank_orders_by_overlap(port: int) -> None:
    body = {"model": "BAAI/bge-reranker-base", "query": "What is the capital of France?"}
    status, answer = post_json(port, "/v1/rerank", {**body, "documents": DOCUMENTS})
    assert status == 200, answer
    assert answer["id"].startswith("rerank-") and answer["model"] == "BAAI/bge-reranker-base"
    assert list(answer) == ["id", "model", "usage", "results"]
    # query: 30 bytes -> 8 tokens, with each document (7, 8, 13, 5 tokens)
    assert answer["usage"] == {"total_tokens": 4 * 8 + 7 + 8 + 13 + 5}
    results = answer["results"]
    assert [r["index"] for r in results] == [1, 2, 0, 3]
    assert [r["relevance_score"] for r in results] == [5 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert results[0]["document"] == {"text": "Paris is the capital of France."}
    assert results[2]["document"] == {"text": DOCUMENTS[0]}
    assert records(port)[-1]["body"]["documents"] == DOCUMENTS


def test_rerank_top_n_and_no_documents(port: int) -> None:
    body = {"query": "capital of France", "documents": DOCUMENTS, "top_n": 2}
    status, answer = post_json(port, "/v1/rerank", {**body, "return_documents": False})
    assert status == 200, answer
    assert answer["model"] == "fake-model"
    assert answer["results"] == [
        {"index": 1, "relevance_score": 1.0},
        {"index": 2, "relevance_score": 2 / 3},
    ]
    status, answer = post_json(
        port, "/v1/rerank", {**body, "top_n": 9, "truncate_prompt_tokens": 512}
    )  # vLLM's own parameters pass; a top_n beyond the documents means all
    assert status == 200 and len(answer["results"]) == 4
    status, answer = post_json(port, "/v1/rerank", body, **{"x-fake-no-usage": "1"})
    assert status == 200 and "usage" not in answer


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"documents": ["a"]}, "query", "missing_required_parameter"),
        ({"query": 1, "documents": ["a"]}, "query", "invalid_type"),
        ({"query": "q"}, "documents", "missing_required_parameter"),
        ({"query": "q", "documents": []}, "documents", "invalid_type"),
        ({"query": "q", "documents": ["a", {"image": "u"}]}, "documents[1]", "invalid_type"),
        ({"query": "q", "documents": ["a"], "top_n": -1}, "top_n", "invalid_value"),
        (
            {"query": "q", "documents": ["a"], "return_documents": "yes"},
            "return_documents",
            "invalid_type",
        ),
    ],
    ids=["no-query", "query-type", "no-documents", "empty", "document-type", "top-n", "return"],
)
def test_rerank_refusals(port: int, body: dict[str, Any], param: str, code: str) -> None:
    status, answer = post_json(port, "/v1/rerank", body)
    assert status == 400, answer
    assert refusal(answer) == (param, code)


# -- faults ---------------------------------------------------------------------------------------


def test_faults_as_on_the_chat_endpoint(client: openai.OpenAI, port: int) -> None:
    with pytest.raises(openai.RateLimitError):
        client.images.generate(prompt=PROMPT, extra_headers={"x-fake-fault": "429"})
    with pytest.raises(openai.InternalServerError):
        client.audio.speech.create(
            model="tts-1", input="x", voice="alloy", extra_headers={"x-fake-fault": "503"}
        )
    with pytest.raises(openai.APIConnectionError):
        client.audio.transcriptions.create(
            file=("a.wav", wav_file(1)),
            model="whisper-1",
            extra_headers={"x-fake-fault": "reset-after:1"},
        )
    status, _, _ = post(
        port, "/v1/rerank", {"query": "q", "documents": ["a"]}, **{"x-fake-fault": "500"}
    )
    assert status == 500
    paths = [record["path"] for record in records(port)[-4:]]
    assert paths == [
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/rerank",
    ]
