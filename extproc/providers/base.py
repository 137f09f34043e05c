"""What a backend's provider format gives the request path: the client's OpenAI request in the
provider's terms, the provider's answers and errors back in OpenAI's (issue: every major
provider behind the one OpenAI endpoint). One module per provider format beside this one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProviderError:
    """A provider's error answer as the client gets it: OpenAI's error shape, with the status
    the client should see (a provider's own non-standard statuses mapped to standard ones)."""

    status: int
    message: str
    type: str
    code: str

    def body(self) -> dict[str, object]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }
