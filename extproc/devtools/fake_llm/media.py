"""OpenAI's media endpoints (image generation, speech, transcription and translation) and the
rerank endpoint of vLLM / Jina / Cohere-compatible servers, as the fake speaks them: after
OpenAI's published API reference and the official SDK's types (`openai.types.images_response`,
`image_generate_params`, `audio/*`), and vLLM's `RerankRequest` / `RerankResponse`. Each is
wrapped by `FakeLLM.v1`, so it is recorded for `/_fake/requests` and takes the common faults
(`x-fake-fault`, `--fault`: 429, 500, 503, reset and stall before the answer; `reset-after:N`
and `stall-after:N` as their plain forms) and `x-fake-ttft-ms` (how late it answers).

`POST /v1/images/generations` (JSON). `prompt` is required (at most 1000 characters for
`dall-e-2`, 4000 for `dall-e-3`, 32000 for the GPT image models); `model` defaults to
`dall-e-2`, or to `gpt-image-1` when a parameter only the GPT image models take is given
(`background`, `moderation`, `output_compression`, `output_format`, `partial_images`, `stream`,
and the installed SDK's `complexity`, `frame_count`, `frame_duration_ms`, `svg`), which the
DALL·E models refuse (400 `unsupported_parameter`). `n` is 1..10 (1 for `dall-e-3`); `size`
and `quality` take the values the model takes (`WIDTHxHEIGHT`, multiples of 16 up to
3840x2160, for `gpt-image-2*`); `response_format` (`url`, the default, or `b64_json`) and
`style` belong to the DALL·E models: a GPT image model (`gpt-image-*`, `chatgpt-image-*`)
refuses them as unknown parameters, as OpenAI does, and always answers in base64. A model
OpenAI does not name (a self-hosted one) takes either family's parameters and any size. A
parameter the reference does not list: 400 `unknown_parameter`; `stream: true`: 400 naming the
fake. Each image is a 1x1 picture: a PNG (its colour from the prompt and the image's index), or
the `output_format` asked for (jpeg, webp, gif, svg); a URL answer points at
`https://fake.invalid/img/<index>.png`; `dall-e-3` adds a `revised_prompt`. A GPT image
model's answer carries `background`, `output_format`, `quality`, `size` (as asked for; `auto`
read as opaque, medium, 1024x1024), `safety_identifier` (or `user`) when given, and `usage`:
the prompt's tokens at 4 bytes a token as input (all text), and a fixed 272 output tokens an
image (`IMAGE_OUTPUT_TOKENS`: what `gpt-image-1` bills for a low-quality 1024x1024 image),
whatever the size and quality.

`POST /v1/audio/speech` (JSON): `model`, `input` (1..4096 characters) and `voice` (a built-in
name or `{"id": ...}`) are required; `instructions`, `response_format` (`mp3` default, `opus`,
`aac`, `flac`, `wav`, `pcm`), `speed` (0.25..4) and `stream_format` (`audio`; `sse` is refused,
naming the fake, and for `tts-1*` as OpenAI refuses it). The answer is a short stretch of
silence in that format, with its content type (`audio/mpeg`, `audio/opus`, `audio/aac`,
`audio/flac`, `audio/wav`, `audio/pcm`): MPEG-1 layer III frames, an Ogg Opus stream, ADTS
AAC frames, a FLAC stream, a 44-byte-header WAV or raw 16-bit PCM, mono at 24 kHz (44.1 kHz
for the MP3), about 0.1 s of it (`SPEECH_AUDIO`).

`POST /v1/audio/transcriptions` and `/v1/audio/translations` (multipart/form-data, read with
aiohttp's multipart reader): `file` (a file part: an audio file by its extension, flac, m4a,
mp3, mp4, mpeg, mpga, oga, ogg, wav or webm, or an `audio/*` content type; at most 25 MB) and
`model` are required: missing, 400 `missing_required_parameter` naming the param. The other
fields are the reference's (`language` ISO-639-1, `prompt`, `temperature` 0..1,
`response_format`, and for transcriptions `include[]`, `timestamp_granularities[]` (only with
`verbose_json`), `chunking_strategy`, `keywords[]`, `languages[]`, `known_speaker_names[]`,
`known_speaker_references[]`, `stream`); another field: 400 `unknown_parameter`. The transcript
is canned (or `x-fake-response-text`): `json` answers `{"text"}`, `text`, `srt` and `vtt` plain
text, `verbose_json` the text with a segment (and words), `diarized_json` (the diarizing model
only) one speaker segment. The `gpt-*transcribe*` models take `json` and `text` only (what the
API answers; the reference says `json`), and their JSON carries token usage: the audio at 10
tokens a second, the prompt's text tokens, the transcript's tokens as output; any other
model's JSON carries `{"type": "duration", "seconds"}`. The audio's duration is read from a WAV
file's header, or taken as 16 kB a second. `stream=true` is refused naming the fake (ignored for
`whisper-1`, as OpenAI ignores it). The request's record (`/_fake/requests`) shows the form
as its body: the fields (a list for the `[]` ones) and the file as `{"filename",
"content_type", "bytes"}`.

`POST /v1/rerank` (JSON, vLLM's shape, which Jina and Cohere clients read): `query` (a string)
and `documents` (strings or `{"text"}` objects) are required; `model` (default
`fake-model`), `top_n` (0, the default, for all) and `return_documents` (default true). Other
keys are ignored, as vLLM ignores them. The answer `{"id", "model", "usage": {"total_tokens"},
"results": [{"index", "relevance_score", "document": {"text"}}]}` ranks the documents by the
share of the query's words each holds (ties in input order); usage counts each query-document
pair at 4 bytes a token.

`x-fake-no-usage: 1` leaves the usage out of every answer here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol

from .faults import non_stream_fault, pause
from .responses import (
    _bad_type,
    _bad_value,
    _integer,
    _number,
    _optional,
    _unknown,
)
from .settings import RequestSettings
from .wire import (
    DEFAULT_MODEL,
    RequestError,
    estimate_tokens,
    is_int,
    json_response,
    missing_parameter,
    require_object,
)

if TYPE_CHECKING:
    from .endpoints import FakeLLM


def _unserved(param: str, what: str) -> RequestError:
    return RequestError(
        f"{what} is not served by fake-llm.", param=param, code="unsupported_parameter"
    )


def _string(body: Mapping[str, Any], name: str, *, required: bool, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise missing_parameter(name)
        return None
    if not isinstance(value, str):
        raise _bad_type(name, "a string", value)
    if not value:
        raise RequestError(
            f"Invalid '{name}': string too short. Expected a string with minimum length 1, but "
            "got an empty string instead.",
            param=name,
            code="string_below_min_length",
        )
    if len(value) > limit:
        raise RequestError(
            f"Invalid '{name}': string too long. Expected a string with maximum length {limit}, "
            f"but got a string with length {len(value)} instead.",
            param=name,
            code="string_above_max_length",
        )
    return value


def _choice(body: Mapping[str, Any], name: str, supported: Iterable[str]) -> str | None:
    value = _optional(body, name, str, "a string")
    options = tuple(supported)
    if value is not None and value not in options:
        raise _bad_value(name, value, options)
    return value


# -- images ---------------------------------------------------------------------------------------

_IMAGE_FIELDS = frozenset(
    {
        "prompt", "model", "n", "size", "response_format", "quality", "style", "user",
        "background", "moderation", "output_compression", "output_format", "partial_images",
        "stream", "safety_identifier", "complexity", "frame_count", "frame_duration_ms", "svg",
    }
)  # fmt: skip
# Parameters only the GPT image models take: given without a model, they choose gpt-image-1.
_GPT_IMAGE_ONLY = (
    "background", "moderation", "output_compression", "output_format", "partial_images", "stream",
    "complexity", "frame_count", "frame_duration_ms", "svg",
)  # fmt: skip
# Parameters of the retired DALL·E models a GPT image model refuses as unknown.
_DALL_E_ONLY = ("response_format", "style")
# What a GPT image model bills for one low-quality 1024x1024 image (the fake's fixed figure).
IMAGE_OUTPUT_TOKENS = 272
IMAGE_URL = "https://fake.invalid/img/{index}.png"
_STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


@dataclass(frozen=True, slots=True)
class _ImageModel:
    prompt_limit: int
    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int = 10
    gpt: bool = False  # a GPT image model: base64 only, usage, the gpt-only parameters
    dall_e: bool = False  # a DALL·E model: refuses the gpt-only parameters
    free_size: bool = False  # any WIDTHxHEIGHT within the gpt-image-2 limits


_DALL_E_2 = _ImageModel(
    1000, ("256x256", "512x512", "1024x1024"), ("standard", "auto"), dall_e=True
)
_DALL_E_3 = _ImageModel(
    4000, ("1024x1024", "1792x1024", "1024x1792"), ("standard", "hd", "auto"), 1, dall_e=True
)
_GPT_QUALITIES = ("low", "medium", "high", "auto")


def _image_model(name: str) -> _ImageModel:
    if name == "dall-e-2":
        return _DALL_E_2
    if name == "dall-e-3":
        return _DALL_E_3
    if name.startswith(("gpt-image-", "chatgpt-image-")):
        qualities: tuple[str, ...] = _GPT_QUALITIES
        if name.startswith("gpt-image-2.5"):
            qualities = (*_GPT_QUALITIES[:3], "xhigh", "max", "auto")
        return _ImageModel(
            32000, _STANDARD_SIZES, qualities, gpt=True, free_size=name.startswith("gpt-image-2")
        )
    # A model OpenAI does not name (a self-hosted one): either family's parameters, any size,
    # the answer in the format asked for, no usage.
    return _ImageModel(32000, (), ("standard", "hd", "low", "medium", "high", "auto"))


def _check_size(size: str, model: _ImageModel) -> None:
    if size in model.sizes or (not model.sizes and (size == "auto" or _SIZE.fullmatch(size))):
        return
    if model.free_size and (match := _SIZE.fullmatch(size)):
        width, height = int(match[1]), int(match[2])
        if (
            width % 16 == 0
            and height % 16 == 0
            and max(width, height) <= 3840
            and width * height <= 3840 * 2160
            and width <= 3 * height
            and height <= 3 * width
        ):
            return
        raise RequestError(
            f"Invalid size '{size}'. Width and height must both be divisible by 16, the aspect "
            "ratio must be between 1:3 and 3:1, and the resolution at most 3840x2160.",
            param="size",
            code="invalid_value",
        )
    raise _bad_value("size", size, model.sizes or ("WIDTHxHEIGHT",))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_pixel(rgb: bytes) -> bytes:
    """A 1x1 RGB PNG of that colour."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" + rgb))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_pixel() -> bytes:
    """A 1x1 grey baseline JPEG: one 8x8 block whose DC and AC are each a one-bit code."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # BITS: one code of length 1; its value 0
    return b"".join(
        (
            b"\xff\xd8",  # SOI
            b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
            b"\xff\xdb\x00\x43\x00" + b"\x01" * 64,  # DQT 0, all ones
            b"\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00",  # SOF0 1x1, one component
            b"\xff\xc4\x00\x14\x00" + one_code,  # DHT DC 0: category 0
            b"\xff\xc4\x00\x14\x10" + one_code,  # DHT AC 0: end of block
            b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00",  # SOS
            b"\x3f",  # DC "0", EOB "0", padded with ones
            b"\xff\xd9",  # EOI
        )
    )


_IMAGES = {
    "jpeg": _jpeg_pixel(),
    # The well-known 1x1 images: a transparent GIF, and the lossless WebP feature probes use.
    "gif": base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="),
    "webp": base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA=="),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>',
}


def image_bytes(output_format: str, prompt: str, index: int) -> bytes:
    if output_format == "png":
        digest = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
        return png_pixel(digest[:3])
    return _IMAGES[output_format]


def _check_gpt_image_extras(body: Mapping[str, Any], output_format: str, n: int) -> None:
    _choice(body, "moderation", ("low", "auto"))
    _choice(body, "complexity", ("low", "medium", "high"))
    background = _choice(body, "background", ("transparent", "opaque", "auto"))
    if background == "transparent" and output_format not in ("png", "webp"):
        raise RequestError(
            "Transparent backgrounds need output_format 'png' or 'webp'.",
            param="background",
            code="invalid_value",
        )
    _integer(body, "output_compression", 0, 100)
    _integer(body, "partial_images", 0, 3)
    for name, low, high in (("frame_count", 2, 16), ("frame_duration_ms", 10, 655350)):
        if _integer(body, name, low, high) is not None and output_format != "gif":
            raise RequestError(
                f"'{name}' is only supported with output_format 'gif'.",
                param=name,
                code="invalid_value",
            )
    svg = body.get("svg")
    if svg is not None:
        if not isinstance(svg, dict):
            raise _bad_type("svg", "an object", svg)
        for key in svg:
            if key not in ("model", "reasoning"):
                raise _unknown(f"svg.{key}")
        if output_format != "svg" or n != 1:
            raise RequestError(
                "'svg' needs output_format 'svg' and n=1.", param="svg", code="invalid_value"
            )


# -- audio ----------------------------------------------------------------------------------------

_SPEECH_FIELDS = frozenset(
    {"model", "input", "voice", "instructions", "response_format", "speed", "stream_format"}
)
_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
    "verse", "marin", "cedar",
)  # fmt: skip
SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
SPEECH_RATE = 24000  # OpenAI's PCM: 24 kHz, 16-bit signed little-endian, mono
_SPEECH_SAMPLES = SPEECH_RATE // 10  # 0.1 s


def _mp3_silence() -> bytes:
    # MPEG-1 layer III, 32 kbit/s, 44.1 kHz, mono: 104-byte frames of 1152 samples whose
    # zeroed side information decodes to silence; four of them are 0.1 s.
    return (b"\xff\xfb\x10\xc4" + bytes(100)) * 4


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(packet: bytes, sequence: int, flags: int, granule: int) -> bytes:
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, 0x66616B65, sequence, 0, 0)
    page = header[:-1] + bytes([len(lacing)]) + lacing + packet
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def _opus_silence() -> bytes:
    # Ogg Opus (RFC 7845): the ID and comment headers, then five 20 ms CELT frames of zero
    # length (RFC 6716: an empty frame is silence to the decoder), granule at 48 kHz.
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, SPEECH_RATE, 0, 0)
    vendor = b"fake-llm"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [_ogg_page(head, 0, 0x02, 0), _ogg_page(tags, 1, 0x00, 0)]
    pages.extend(
        _ogg_page(b"\xf8", 2 + i, 0x04 if i == 4 else 0x00, 312 + 960 * (i + 1)) for i in range(5)
    )
    return b"".join(pages)


def _aac_silence() -> bytes:
    # ADTS frames (MPEG-4 AAC LC, 24 kHz, mono) holding the silent raw data block of a mono
    # AAC-LC stream, each 1024 samples; three of them are 0.128 s.
    raw = b"\x00\xc8\x00\x80\x23\x80"
    length = 7 + len(raw)
    profile, rate_index, channels = 1, 6, 1
    header = bytes(
        (
            0xFF,
            0xF1,
            (profile << 6) | (rate_index << 2) | (channels >> 2),
            ((channels & 3) << 6) | (length >> 11),
            (length >> 3) & 0xFF,
            ((length & 7) << 5) | 0x1F,
            0xFC,
        )
    )
    return (header + raw) * 3


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _flac_silence() -> bytes:
    # STREAMINFO, then one frame: a CONSTANT subframe of zeros, 2400 16-bit mono samples.
    samples = _SPEECH_SAMPLES
    header = b"\xff\xf8" + bytes((0x77, 0x08, 0x00)) + struct.pack(">H", samples - 1)
    frame = header + bytes((_crc8(header),)) + b"\x00\x00\x00"
    frame += struct.pack(">H", _crc16(frame))
    md5 = hashlib.md5(bytes(2 * samples)).digest()
    info = struct.pack(">HH", samples, samples)
    info += len(frame).to_bytes(3, "big") * 2
    # 20 bits sample rate, 3 bits channels - 1, 5 bits bits-per-sample - 1, 36 bits samples.
    info += ((SPEECH_RATE << 44) | (0 << 41) | (15 << 36) | samples).to_bytes(8, "big") + md5
    return b"fLaC" + bytes((0x80,)) + len(info).to_bytes(3, "big") + info + frame


def wav_header(data_bytes: int, rate: int = SPEECH_RATE) -> bytes:
    """The 44-byte RIFF/WAVE header of 16-bit mono PCM."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
        b"data", data_bytes,
    )  # fmt: skip


_PCM = bytes(2 * _SPEECH_SAMPLES)
SPEECH_AUDIO = {
    "mp3": _mp3_silence(),
    "opus": _opus_silence(),
    "aac": _aac_silence(),
    "flac": _flac_silence(),
    "wav": wav_header(len(_PCM)) + _PCM,
    "pcm": _PCM,
}

# -- transcription and translation ----------------------------------------------------------------

CANNED_TRANSCRIPT = "This is a fake transcript of the audio."
CANNED_TRANSLATION = "This is a fake translation of the audio."
MAX_AUDIO_BYTES = 25 * 1024 * 1024
_AUDIO_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
_ASSUMED_BYTES_PER_SECOND = 16000
_AUDIO_TOKENS_PER_SECOND = 10
_TRANSCRIPTION_FIELDS = frozenset(
    {
        "file", "model", "language", "prompt", "response_format", "temperature", "include",
        "timestamp_granularities", "chunking_strategy", "keywords", "languages",
        "known_speaker_names", "known_speaker_references", "stream",
    }
)  # fmt: skip
_TRANSLATION_FIELDS = frozenset({"file", "model", "prompt", "response_format", "temperature"})
_LIST_FIELDS = frozenset(
    {
        "include", "timestamp_granularities", "keywords", "languages", "known_speaker_names",
        "known_speaker_references",
    }
)  # fmt: skip
_TEXT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_CHUNKING_FIELD = re.compile(
    r"chunking_strategy\[(type|prefix_padding_ms|silence_duration_ms|threshold)\]"
)
_LANGUAGES = {
    "en": "english", "de": "german", "es": "spanish", "fr": "french", "it": "italian",
    "ja": "japanese", "nl": "dutch", "pt": "portuguese", "ru": "russian", "zh": "chinese",
}  # fmt: skip


@dataclass(slots=True)
class _Upload:
    filename: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class _Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, _Upload] = field(default_factory=dict)

    def one(self, name: str) -> str | None:
        values = self.fields.get(name)
        return None if values is None else values[-1]

    def summary(self) -> dict[str, Any]:
        """The form as the request's record shows it."""
        out: dict[str, Any] = {
            name: values if name in _LIST_FIELDS or len(values) > 1 else values[0]
            for name, values in self.fields.items()
        }
        for name, upload in self.files.items():
            out[name] = {
                "filename": upload.filename,
                "content_type": upload.content_type,
                "bytes": len(upload.data),
            }
        return out


def record_form(fake: FakeLLM, request: web.Request, form: _Form) -> None:
    """FakeLLM.v1 recorded the request with no body (it is not JSON): the form becomes that
    record's body, found by its path and its Content-Type (the boundary is per request)."""
    content_type = request.headers.get("Content-Type")
    for record in reversed(fake.records):
        if (
            record["body"] is None
            and record["path"] == request.path
            and record["headers"].get("content-type") == content_type
        ):
            record["body"] = form.summary()
            return


async def _read_form(request: web.Request) -> _Form:
    if request.content_type != "multipart/form-data":
        raise RequestError(
            f"Invalid Content-Type header ({request.content_type or 'none'}), expected "
            "multipart/form-data.",
            code="invalid_content_type",
        )
    raw = await request.read()  # already read (and recorded) by FakeLLM.v1
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), max(len(raw), 2**16), loop=loop)
    stream.feed_data(raw)
    stream.feed_eof()
    form = _Form()
    try:
        reader = MultipartReader(request.headers, stream)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ValueError("a part without a name")
            name = part.name.removesuffix("[]")
            if part.filename is not None:
                data = bytes(await part.read(decode=True))
                kind = part.headers.get("Content-Type", "application/octet-stream")
                form.files[name] = _Upload(part.filename, kind, data)
            else:
                form.fields.setdefault(name, []).append(await part.text())
    except (ValueError, AssertionError, UnicodeDecodeError) as exc:
        raise RequestError(
            f"Could not parse the multipart form: {exc}", code="invalid_multipart"
        ) from None
    return form


def _audio_duration(data: bytes) -> float:
    """Seconds of audio: from a WAV file's header, else at an assumed 16 kB a second."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        offset, byte_rate = 12, 0
        while offset + 8 <= len(data):
            kind, size = struct.unpack_from("<4sI", data, offset)
            if kind == b"fmt " and size >= 16:
                byte_rate = struct.unpack_from("<I", data, offset + 16)[0]
            elif kind == b"data" and byte_rate:
                return min(size, len(data) - offset - 8) / byte_rate
            offset += 8 + size + (size & 1)
    return len(data) / _ASSUMED_BYTES_PER_SECOND


def _form_number(form: _Form, name: str, low: float, high: float) -> float | None:
    raw = form.one(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise RequestError(
            f"Invalid '{name}': expected a number between {low:g} and {high:g}, got '{raw}'.",
            param=name,
            code="invalid_value",
        )
    return value


def _form_bool(form: _Form, name: str) -> bool:
    raw = form.one(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise _bad_value(name, raw, ("true", "false"))


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _text_response(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _segment(text: str, duration: float, temperature: float) -> dict[str, Any]:
    return {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": round(duration, 3),
        "text": text,
        "tokens": [50364 + i for i in range(len(text.split()))],
        "temperature": temperature,
        "avg_logprob": -0.25,
        "compression_ratio": 1.0,
        "no_speech_prob": 0.01,
    }


def _words(text: str, duration: float) -> list[dict[str, Any]]:
    words = text.split()
    step = duration / max(1, len(words))
    return [
        {"word": word, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
        for i, word in enumerate(words)
    ]


def _is_token_model(model: str) -> bool:
    # gpt-4o-transcribe, gpt-4o-mini-transcribe(-DATE), gpt-4o-transcribe-diarize, gpt-transcribe
    return model.startswith("gpt-") and "transcribe" in model


@dataclass(frozen=True, slots=True)
class _AudioAsk:
    """A checked transcription or translation request."""

    translate: bool
    model: str
    upload: _Upload
    response_format: str
    language: str | None
    prompt: str | None
    temperature: float
    logprobs: bool
    granularities: tuple[str, ...]
    speakers: tuple[str, ...]


def _check_audio_form(form: _Form, *, translate: bool) -> _AudioAsk:
    allowed = _TRANSLATION_FIELDS if translate else _TRANSCRIPTION_FIELDS
    for name in (*form.fields, *form.files):
        if name not in allowed and (translate or not _CHUNKING_FIELD.fullmatch(name)):
            raise _unknown(name)
    if "file" in form.fields:
        raise RequestError(
            "Invalid 'file': expected a file upload, got a text field.",
            param="file",
            code="invalid_type",
        )
    upload = form.files.get("file")
    if upload is None:
        raise missing_parameter("file")
    for name in form.files:
        if name != "file":
            raise RequestError(
                f"Invalid '{name}': expected a text field, got a file upload.",
                param=name,
                code="invalid_type",
            )
    model = form.one("model")
    if model is None:
        raise missing_parameter("model")
    if not model:
        raise RequestError(
            "'model' must be a non-empty string", param="model", code="invalid_value"
        )
    _check_audio_file(upload)

    token_model = _is_token_model(model)
    diarize = token_model and model.endswith("-diarize")
    formats = _TEXT_FORMATS if translate else (*_TEXT_FORMATS, "diarized_json")
    response_format = form.one("response_format") or "json"
    if response_format not in formats:
        raise _bad_value("response_format", response_format, formats)
    compatible: tuple[str, ...]
    if token_model:
        compatible = ("json", "text", "diarized_json") if diarize else ("json", "text")
    else:
        compatible = _TEXT_FORMATS
    if response_format not in compatible:
        listed = " or ".join(f"'{f}'" for f in compatible)
        raise RequestError(
            f"response_format '{response_format}' is not compatible with model '{model}'. Use "
            f"{listed} instead.",
            param="response_format",
            code="unsupported_value",
        )
    temperature = _form_number(form, "temperature", 0.0, 1.0) or 0.0
    language = form.one("language")
    if language is not None and not re.fullmatch(r"[a-z]{2}", language):
        raise RequestError(
            f"Invalid language '{language}'. Language parameter must be specified in ISO-639-1 "
            "format.",
            param="language",
            code="invalid_language_format",
        )
    include = form.fields.get("include", [])
    for item in include:
        if item != "logprobs":
            raise _bad_value("include", item, ("logprobs",))
    if include and (not token_model or diarize or response_format != "json"):
        raise RequestError(
            "include 'logprobs' needs response_format 'json' and the model gpt-4o-transcribe or "
            "gpt-4o-mini-transcribe.",
            param="include",
            code="unsupported_value",
        )
    granularities = form.fields.get("timestamp_granularities", [])
    for item in granularities:
        if item not in ("word", "segment"):
            raise _bad_value("timestamp_granularities", item, ("word", "segment"))
    if granularities and response_format != "verbose_json":
        raise RequestError(
            "timestamp_granularities needs response_format 'verbose_json'.",
            param="timestamp_granularities",
            code="invalid_value",
        )
    chunking = form.one("chunking_strategy")
    if chunking is not None and chunking != "auto":
        raise _bad_value("chunking_strategy", chunking, ("auto",))
    vad = form.one("chunking_strategy[type]")
    if vad is not None and vad != "server_vad":
        raise _bad_value("chunking_strategy[type]", vad, ("server_vad",))
    if _form_bool(form, "stream") and model != "whisper-1":  # whisper-1: ignored, as by OpenAI
        raise _unserved("stream", "Transcription streaming")
    return _AudioAsk(
        translate=translate,
        model=model,
        upload=upload,
        response_format=response_format,
        language=language,
        prompt=form.one("prompt"),
        temperature=temperature,
        logprobs=bool(include),
        granularities=tuple(granularities),
        speakers=tuple(form.fields.get("known_speaker_names", ())),
    )


def _audio_answer(ask: _AudioAsk, text: str, *, with_usage: bool) -> web.Response:
    duration = _audio_duration(ask.upload.data)
    if ask.response_format == "text":
        return _text_response(text + "\n")
    if ask.response_format == "srt":
        span = f"{_timestamp(0, ',')} --> {_timestamp(duration, ',')}"
        return _text_response(f"1\n{span}\n{text}\n\n")
    if ask.response_format == "vtt":
        span = f"{_timestamp(0, '.')} --> {_timestamp(duration, '.')}"
        return _text_response(f"WEBVTT\n\n{span}\n{text}\n\n")
    answer: dict[str, Any] = {"text": text}
    if ask.response_format == "verbose_json":
        language = "english" if ask.translate else _LANGUAGES.get(ask.language or "en")
        answer = {
            "task": "translate" if ask.translate else "transcribe",
            "language": language or ask.language,
            "duration": round(duration, 3),
            "text": text,
        }
        if not ask.granularities or "segment" in ask.granularities:
            answer["segments"] = [_segment(text, duration, ask.temperature)]
        if "word" in ask.granularities:
            answer["words"] = _words(text, duration)
    elif ask.response_format == "diarized_json":
        segment = {
            "type": "transcript.text.segment",
            "id": "seg_0",
            "start": 0.0,
            "end": round(duration, 3),
            "speaker": ask.speakers[0] if ask.speakers else "A",
            "text": text,
        }
        answer = {
            "task": "transcribe",
            "duration": round(duration, 3),
            "text": text,
            "segments": [segment],
        }
    elif ask.logprobs:
        answer["logprobs"] = [
            {"token": word, "logprob": -0.01, "bytes": list(word.encode())} for word in text.split()
        ]
    if with_usage and not ask.translate:  # a translation reports no usage
        if _is_token_model(ask.model):
            answer["usage"] = transcription_usage(duration, ask.prompt, text)
        else:
            answer["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
    return json_response(answer)


# -- rerank ---------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def relevance(query: str, document: str) -> float:
    """The fake's relevance score: the share of the query's distinct words the document holds."""
    wanted = set(_WORD.findall(query.lower()))
    if not wanted:
        return 0.0
    return len(wanted & set(_WORD.findall(document.lower()))) / len(wanted)


def _documents(value: Any) -> list[str]:
    if value is None:
        raise missing_parameter("documents")
    if not isinstance(value, list) or not value:
        raise RequestError(
            "'documents' must be a non-empty array of strings or {\"text\": ...} objects",
            param="documents",
            code="invalid_type",
        )
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise RequestError(
                f"'documents[{i}]' must be a string or an object with a 'text' string",
                param=f"documents[{i}]",
                code="invalid_type",
            )
        texts.append(item)
    return texts


# -- the endpoints --------------------------------------------------------------------------------


class MediaAPI:
    """The endpoints; `FakeLLM.v1` wraps each (app.py)."""

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake

    async def _answer_after(self, request: web.Request, ctx: RequestSettings) -> None:
        await pause(request, ctx.ttft)
        await non_stream_fault(request, ctx.fault, self.fake.settings.stall_seconds)

    # ----- POST /v1/images/generations

    async def images_generations(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        for key in body:
            if key not in _IMAGE_FIELDS:
                raise _unknown(key)
        name = _optional(body, "model", str, "a string")
        if name is None:
            given = any(body.get(key) is not None for key in _GPT_IMAGE_ONLY)
            name = "gpt-image-1" if given else "dall-e-2"
        elif not name:
            raise RequestError(
                "'model' must be a non-empty string", param="model", code="invalid_type"
            )
        model = _image_model(name)
        if model.gpt:
            for key in _DALL_E_ONLY:
                if key in body:
                    raise _unknown(key)
        elif model.dall_e:
            for key in _GPT_IMAGE_ONLY:
                if body.get(key) is not None:
                    raise RequestError(
                        f"'{key}' is only supported for the GPT image models.",
                        param=key,
                        code="unsupported_parameter",
                    )
        prompt = _string(body, "prompt", required=True, limit=model.prompt_limit)
        assert prompt is not None
        n = _integer(body, "n", 1, 10)
        n = 1 if n is None else n
        if n > model.max_n:
            raise RequestError(
                f"Invalid 'n': {name} supports n={model.max_n} only.",
                param="n",
                code="integer_above_max_value",
            )
        size = _optional(body, "size", str, "a string")
        if size is not None:
            _check_size(size, model)
        quality = _choice(body, "quality", model.qualities)
        response_format = _choice(body, "response_format", ("url", "b64_json"))
        _choice(body, "style", ("vivid", "natural"))
        for key in ("user", "safety_identifier"):
            _optional(body, key, str, "a string")
        output_format = _choice(body, "output_format", ("png", "webp", "jpeg", "gif", "svg"))
        output_format = output_format or "png"
        if not model.dall_e:
            _check_gpt_image_extras(body, output_format, n)
        stream = _optional(body, "stream", bool, "a boolean")
        if stream:
            raise _unserved("stream", "Image generation streaming")

        await self._answer_after(request, ctx)
        as_url = not model.gpt and response_format != "b64_json"
        data: list[dict[str, Any]] = []
        for index in range(n):
            if as_url:
                image: dict[str, Any] = {"url": IMAGE_URL.format(index=index)}
            else:
                encoded = base64.b64encode(image_bytes(output_format, prompt, index))
                image = {"b64_json": encoded.decode("ascii")}
            if name == "dall-e-3":
                image["revised_prompt"] = f"A picture of {prompt}"
            data.append(image)
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model.gpt:
            background = body.get("background") or "auto"
            answer["background"] = "opaque" if background == "auto" else background
            answer["output_format"] = output_format
            answer["quality"] = "medium" if quality in (None, "auto") else quality
            answer["size"] = "1024x1024" if size in (None, "auto") else size
            if identifier := body.get("safety_identifier") or body.get("user"):
                answer["safety_identifier"] = identifier
            if not ctx.no_usage:
                answer["usage"] = image_usage(prompt, n)
        return json_response(answer)

    # ----- POST /v1/audio/speech

    async def speech(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        for key in body:
            if key not in _SPEECH_FIELDS:
                raise _unknown(key)
        model = _string(body, "model", required=True, limit=256)
        assert model is not None
        _string(body, "input", required=True, limit=4096)
        voice = body.get("voice")
        if voice is None:
            raise missing_parameter("voice")
        if isinstance(voice, dict):
            if set(voice) != {"id"} or not isinstance(voice["id"], str) or not voice["id"]:
                raise RequestError(
                    "A custom voice is an object with one property, 'id' (a string).",
                    param="voice",
                    code="invalid_value",
                )
        elif isinstance(voice, str):
            if voice not in _VOICES:
                raise _bad_value("voice", voice, _VOICES)
        else:
            raise _bad_type("voice", "a string or an object", voice)
        _string(body, "instructions", required=False, limit=4096)
        response_format = _choice(body, "response_format", tuple(SPEECH_CONTENT_TYPES)) or "mp3"
        _number(body, "speed", 0.25, 4.0)
        if _choice(body, "stream_format", ("sse", "audio")) == "sse":
            if model in ("tts-1", "tts-1-hd"):
                raise RequestError(
                    f"stream_format 'sse' is not supported for {model}.",
                    param="stream_format",
                    code="unsupported_value",
                )
            raise _unserved("stream_format", "Speech as server-sent events")
        await self._answer_after(request, ctx)
        return web.Response(
            body=SPEECH_AUDIO[response_format], content_type=SPEECH_CONTENT_TYPES[response_format]
        )

    # ----- POST /v1/audio/transcriptions, /v1/audio/translations

    async def transcriptions(
        self, request: web.Request, ctx: RequestSettings, _raw_body: Any
    ) -> web.Response:
        return await self._audio_text(request, ctx, translate=False)

    async def translations(
        self, request: web.Request, ctx: RequestSettings, _raw_body: Any
    ) -> web.Response:
        return await self._audio_text(request, ctx, translate=True)

    async def _audio_text(
        self, request: web.Request, ctx: RequestSettings, *, translate: bool
    ) -> web.Response:
        form = await _read_form(request)
        record_form(self.fake, request, form)
        ask = _check_audio_form(form, translate=translate)
        self.fake.note_model(ask.model)
        await self._answer_after(request, ctx)
        text = ctx.text
        if text is None:
            text = CANNED_TRANSLATION if translate else CANNED_TRANSCRIPT
        return _audio_answer(ask, text, with_usage=not ctx.no_usage)

    # ----- POST /v1/rerank

    async def rerank(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        model = _optional(body, "model", str, "a string") or DEFAULT_MODEL
        query = body.get("query")
        if query is None:
            raise missing_parameter("query")
        if not isinstance(query, str):
            raise _bad_type("query", "a string", query)
        documents = _documents(body.get("documents"))
        top_n = body.get("top_n")
        if top_n is None:
            top_n = 0
        elif not is_int(top_n) or top_n < 0:
            raise RequestError(
                "'top_n' must be an integer >= 0 (0 for all the documents)",
                param="top_n",
                code="invalid_value",
            )
        return_documents = _optional(body, "return_documents", bool, "a boolean")
        await self._answer_after(request, ctx)
        scored = sorted(
            ((relevance(query, text), index) for index, text in enumerate(documents)),
            key=lambda pair: (-pair[0], pair[1]),
        )
        results = []
        for score, index in scored[: top_n or None]:
            result: dict[str, Any] = {"index": index, "relevance_score": score}
            if return_documents is not False:
                result["document"] = {"text": documents[index]}
            results.append(result)
        query_tokens = estimate_tokens(len(query.encode()))
        total = sum(query_tokens + estimate_tokens(len(text.encode())) for text in documents)
        answer: dict[str, Any] = {"id": f"rerank-{uuid.uuid4().hex}", "model": model}
        if not ctx.no_usage:
            answer["usage"] = {"total_tokens": total}
        answer["results"] = results
        return json_response(answer)


def image_usage(prompt: str, n: int) -> dict[str, Any]:
    text_tokens = estimate_tokens(len(prompt.encode()))
    output = IMAGE_OUTPUT_TOKENS * n
    return {
        "input_tokens": text_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text_tokens + output,
    }


def transcription_usage(duration: float, prompt: str | None, text: str) -> dict[str, Any]:
    audio = max(1, math.ceil(duration * _AUDIO_TOKENS_PER_SECOND))
    prompt_tokens = estimate_tokens(len(prompt.encode())) if prompt else 0
    output = estimate_tokens(len(text.encode()))
    return {
        "type": "tokens",
        "input_tokens": audio + prompt_tokens,
        "input_token_details": {"audio_tokens": audio, "text_tokens": prompt_tokens},
        "output_tokens": output,
        "total_tokens": audio + prompt_tokens + output,
    }


def _check_audio_file(upload: _Upload) -> None:
    extension = upload.filename.rpartition(".")[2].lower() if "." in upload.filename else ""
    if extension not in _AUDIO_EXTENSIONS and not upload.content_type.startswith("audio/"):
        listed = ", ".join(f"'{e}'" for e in _AUDIO_EXTENSIONS)
        raise RequestError(
            f"Invalid file format. Supported formats: [{listed}]",
            param="file",
            code="invalid_value",
        )
    if not upload.data:
        raise RequestError(
            "Audio file is too short. Minimum audio length is 0.1 seconds.",
            param="file",
            code="audio_too_short",
        )
    if len(upload.data) > MAX_AUDIO_BYTES:
        raise RequestError(
            f"Maximum content size limit ({MAX_AUDIO_BYTES}) exceeded ({len(upload.data)} bytes "
            "read)",
            param="file",
            code="file_too_large",
            status=413,
        )
