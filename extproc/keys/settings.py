"""The `keys:` section of the config file, and the key store and directory it describes.

    keys:
      enabled: true              # run-time keys (KeyAdmin, `extproc keys`); off by default
      store: sqlite              # or redis; unset: redis when quota.store is redis, else sqlite
      path: /var/lib/extproc/keys.sqlite   # sqlite only; unset: keys.sqlite next to the config

A relative `path` is relative to the config file's directory, like the default: the working
directory of a sidecar depends on how it was started, and a key store that moves with it would
be a silently empty one. The Redis store uses the Redis of `quota.redis` (its URL, password,
cluster mode and connect timeout), with `timeout_ms` below for its calls: the key store's reads
are larger and rarer than the quota's, and none is on a request's path.

This module imports nothing of extproc.config at import time: the config imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from ..config import QuotaSettings
    from .directory import KeyDirectory
    from .store import KeyStore

DEFAULT_FILE = "keys.sqlite"


class KeysSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Off by default: a store is opened (a file created, or Redis asked) only when asked for.
    enabled: bool = False
    store: Literal["sqlite", "redis"] | None = None
    path: Path | None = None
    # How often each sidecar process asks the store whether a key changed.
    poll_interval_ms: int = Field(default=250, ge=10, le=10_000)
    # After this long without an answer from the store, run-time keys are refused (503) rather
    # than served from a copy that may miss a revocation.
    stale_after_ms: int = Field(default=1000, ge=50, le=600_000)
    # Each call to the store: a Redis command; for SQLite, the wait for another process's write.
    timeout_ms: int = Field(default=500, ge=1, le=60_000)
    # A key's last use is written at most this often per sidecar process.
    touch_interval_s: int = Field(default=60, ge=1, le=86_400)

    @model_validator(mode="after")
    def _consistent(self) -> KeysSettings:
        if self.path is not None and self.store == "redis":
            raise ValueError("'path' is the sqlite store's file; the redis store has none")
        if self.stale_after_ms <= self.poll_interval_ms:
            raise ValueError(
                "stale_after_ms must exceed poll_interval_ms, or the keys would be refused "
                "between two polls"
            )
        return self

    def store_kind(self, quota: QuotaSettings) -> Literal["sqlite", "redis"]:
        if self.store is not None:
            return self.store
        return "redis" if quota.store == "redis" else "sqlite"

    def sqlite_path(self, config_path: str | Path) -> Path:
        base = Path(config_path).parent
        return base / (self.path if self.path is not None else DEFAULT_FILE)


def make_key_store(
    settings: KeysSettings, *, quota: QuotaSettings, config_path: str | Path
) -> KeyStore:
    """The store the settings describe; nothing is opened until its first call."""
    timeout_s = settings.timeout_ms / 1000
    if settings.store_kind(quota) == "sqlite":
        from .sqlite_store import SqliteKeyStore

        return SqliteKeyStore(settings.sqlite_path(config_path), busy_timeout_s=timeout_s)
    from .redis_store import RedisKeyStore

    redis = quota.redis
    return RedisKeyStore.from_url(
        redis.url,
        cluster=redis.cluster,
        password=redis.password.resolve() if redis.password else None,
        timeout_s=timeout_s,
        connect_timeout_s=redis.connect_timeout_ms / 1000,
    )


def make_directory(
    settings: KeysSettings, *, quota: QuotaSettings, config_path: str | Path
) -> KeyDirectory:
    """A directory over the store the settings describe (start() it to load and poll)."""
    from .directory import KeyDirectory

    return KeyDirectory(
        make_key_store(settings, quota=quota, config_path=config_path),
        poll_interval_s=settings.poll_interval_ms / 1000,
        stale_after_s=settings.stale_after_ms / 1000,
        touch_interval_s=settings.touch_interval_s,
    )
