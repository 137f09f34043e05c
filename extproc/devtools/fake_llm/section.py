"""The ``fake_llm:`` section of a config file: `extproc up` reads it, the gateway does not.

The quickstart keeps everything `make run` starts in one file, so the fake's settings sit next
to the gateway's. The gateway sets the section aside (`extproc.config.DEVTOOL_SECTIONS`);
`extproc up` validates it here (as does `extproc check`, through up's reader) and, when it is
there, starts `extproc fake-llm` with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...config import ConfigError, parse_address, validation_problems
from .settings import DEFAULT_LISTEN, FakeLLMSettings

SECTION = "fake_llm"


class FakeLLMSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = DEFAULT_LISTEN
    ttft_ms: float = Field(default=FakeLLMSettings.ttft_ms, ge=0)
    tokens_per_second: float = Field(default=FakeLLMSettings.tokens_per_second, ge=0)
    response_tokens: int = Field(default=FakeLLMSettings.response_tokens, ge=0)

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_address(v)
        return v

    def arguments(self) -> list[str]:
        """The `extproc` command line that runs this fake."""
        return [
            "fake-llm",
            "--listen",
            self.listen,
            "--ttft-ms",
            str(self.ttft_ms),
            "--tokens-per-second",
            str(self.tokens_per_second),
            "--response-tokens",
            str(self.response_tokens),
        ]


def read_section(data: Mapping[str, Any], source: str = "config") -> FakeLLMSection | None:
    """The file's ``fake_llm:`` section, validated; None when it has none."""
    raw = data.get(SECTION)
    if raw is None:
        return None
    try:
        return FakeLLMSection.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, (SECTION,)), source) from None
