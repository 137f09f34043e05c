"""What every ext_proc stream and the access log's reader share: one config's worth of parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .telemetry.tracing import DISABLED, Tracing

if TYPE_CHECKING:
    from .backend_tokens import BackendTokens
    from .config import Runtime
    from .guard.llm import GuardClient
    from .guard.pipeline import Guardrails
    from .keys.directory import KeyDirectory
    from .quota.budgets import Budgets
    from .quota.service import QuotaService
    from .telemetry.audit import AuditTrail
    from .tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class Services:
    """A reload builds a new one and swaps it in whole; a stream keeps the one it started with,
    so one request never mixes two configs."""

    runtime: Runtime
    tokens: TokenCounter
    quota: QuotaService
    budgets: Budgets  # every level's limits
    guards: Guardrails
    guard_client: GuardClient  # one HTTP session for every guard call, kept across reloads
    backend_tokens: BackendTokens  # the backends' identity tokens, kept across reloads
    tracing: Tracing = DISABLED  # built once at start-up
    audit: AuditTrail | None = None  # None: no audit trail; the same trail across reloads
    keys: KeyDirectory | None = None  # run-time keys (keys.enabled); the same across reloads
