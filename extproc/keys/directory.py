"""Every run-time key of the store in this process's memory, so that the request path finds a
key with no I/O: `lookup(secret)` hashes it and reads a dict.

The copy is kept current by polling: every 250 ms the store's revision is read (one small
read), and every key reloaded only when it moved. "A revoked or expired key is refused by every
sidecar process within one second" then holds this way:

  - expiry is checked against the clock at each lookup, never cached;
  - a revocation reaches the copy at the first poll that starts after it (a quarter second);
  - when no poll has succeeded for `stale_after_s` (1 s), because the store is down or slow,
    the copy may miss a revocation: lookup raises KeysUnavailable rather than answer from it,
    and the caller refuses the request (503, fail closed). Freshness counts from when the last
    successful poll *started*, so a slow answer cannot make the copy look newer than it is.

Only secrets shaped like run-time keys (records.SECRET_PREFIX) are looked up: any other is
"not one of ours" at once, even while the copy is not trusted, so that the config file's keys
(which the caller checks first) and garbage never wait on the store.

Last use. A lookup that finds a key notes the time, at most once per `touch_interval_s` per
key; a background task writes the notes to the store. Nothing on the request path waits for it.

The directory owns its store: close() closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from .records import KeyRecord, KeyStoreUnavailable, KeysUnavailable, digest_of, looks_like_secret
from .store import KeyStore, Snapshot

log = logging.getLogger("extproc.keys")


class KeyDirectory:
    def __init__(
        self,
        store: KeyStore,
        *,
        poll_interval_s: float = 0.25,
        stale_after_s: float = 1.0,
        touch_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,  # expiry, revocation, last use: unix time
        monotonic: Callable[[], float] = time.monotonic,  # the copy's age
    ) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self.touch_interval_s = touch_interval_s
        self._clock = clock
        self._monotonic = monotonic
        # digest -> (record, until): until is None for a key's current secret, else the end of
        # the grace period of the secret before its last rotation.
        self._index: dict[bytes, tuple[KeyRecord, float | None]] = {}
        # Every key of the store by id, revoked and expired ones too: a request admitted with a
        # key that was revoked meanwhile still settles against the key's limits.
        self._by_id: dict[str, KeyRecord] = {}
        self._revision: int | None = None
        self._fresh_at = -math.inf  # monotonic start of the last successful poll
        self._refresh_lock = asyncio.Lock()
        self._touched: dict[str, float] = {}  # key id -> when this process last noted a use
        self._pending: dict[str, float] = {}  # key id -> a use not written yet
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False

    # -- the request path -----------------------------------------------------------------------

    def lookup(self, secret: str) -> KeyRecord | None:
        """The usable key with this secret (not revoked, not expired, or its previous secret
        within a rotation's grace period); None when there is none. Raises KeysUnavailable when
        the secret may be a run-time key and the copy is too old to answer for it."""
        if not looks_like_secret(secret):
            return None
        if not self.trusted:
            raise KeysUnavailable(
                f"run-time keys not confirmed for more than {self.stale_after_s:g}s "
                "(the key store does not answer)"
            )
        # Looking up by digest leaks nothing useful (a sha256 prefix cannot be steered); the
        # index holds each record under the very digest it is found by (_install).
        hit = self._index.get(digest_of(secret))
        if hit is None:
            return None
        record, until = hit
        now = self._clock()
        if not record.usable(now) or (until is not None and now >= until):
            return None
        self._note_use(record.id, now)
        return record

    def _note_use(self, key_id: str, now: float) -> None:
        if now - self._touched.get(key_id, -math.inf) < self.touch_interval_s:
            return
        self._touched[key_id] = now
        self._pending[key_id] = now
        self._wake.set()

    def by_id(self, key_id: str) -> KeyRecord | None:
        """The key with this id as last loaded, usable or not (its limits, to settle)."""
        return self._by_id.get(key_id)

    @property
    def trusted(self) -> bool:
        """Whether lookup answers from the copy now (else it raises KeysUnavailable)."""
        return self._monotonic() - self._fresh_at <= self.stale_after_s

    # -- keeping the copy current ---------------------------------------------------------------

    async def start(self, timeout_s: float = 5.0) -> None:
        """Load the keys (within `timeout_s`; a store that does not answer is logged, not
        fatal: the config file's keys keep working), then poll in the background."""
        if self._tasks:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.refresh()
        except TimeoutError:
            log.error("key store: no answer within %.1fs at start-up; still trying", timeout_s)
        self._tasks = [
            asyncio.create_task(self._poll(), name="keys-poll"),
            asyncio.create_task(self._write_uses(), name="keys-touch"),
        ]

    async def refresh(self) -> bool:
        """One poll: read the revision, reload every key if it moved. False when the store did
        not answer (the copy keeps its age)."""
        async with self._refresh_lock:
            started = self._monotonic()
            try:
                # Bounded whatever the store: a hung read (a SQLite lock, a frozen Redis) must
                # not hold this lock, and the copy's age says the rest.
                async with asyncio.timeout(max(self.stale_after_s, 1.0)):
                    revision = await self.store.revision()
                    if revision != self._revision:
                        self._install(await self.store.snapshot())
            except (KeyStoreUnavailable, TimeoutError) as exc:
                if not self._failing:
                    self._failing = True
                    log.error("key store unavailable: %s", exc or "no answer in time")
                return False
            if self._failing:
                self._failing = False
                log.info("key store answers again")
            self._fresh_at = max(self._fresh_at, started)
            return True

    def _install(self, snapshot: Snapshot) -> None:
        now = self._clock()
        index: dict[bytes, tuple[KeyRecord, float | None]] = {}
        for record in snapshot.records:
            # Keys that can no longer work are left out; lookup checks the times again anyway.
            if not record.usable(now):
                continue
            index[record.digest] = (record, None)
            if record.previous_usable(now):
                assert record.previous_digest is not None  # previous_usable says so
                index[record.previous_digest] = (record, record.previous_valid_until)
        self._index = index  # one assignment: a lookup sees the old copy or the new, whole
        self._by_id = {record.id: record for record in snapshot.records}
        self._revision = snapshot.revision
        log.debug("run-time keys reloaded: %d usable, revision %d", len(index), snapshot.revision)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                # A bug must not stop the polls: the copy would silently go stale (and then
                # refuse every run-time key).
                log.exception("key store poll failed")
            await asyncio.sleep(self.poll_interval_s)

    async def _write_uses(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush_uses()

    async def flush_uses(self) -> None:
        """Write the uses noted so far to the store. A failed write is dropped, not retried:
        last use is informative, and the key's next use a minute later writes it again."""
        pending, self._pending = self._pending, {}
        failed: list[tuple[str, KeyStoreUnavailable]] = []
        for key_id, when in pending.items():
            try:
                await self.store.touch(key_id, when)
            except KeyStoreUnavailable as exc:
                failed.append((key_id, exc))
        if failed:
            # One line per flush: with the store down, one per key would flood the log.
            first, problem = failed[0]
            log.warning(
                "key store: last use of %d key(s) not recorded (%s, ...): %s",
                len(failed),
                first,
                problem,
            )

    async def close(self) -> None:
        """Stop polling, write the last uses (briefly), close the store."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.flush_uses()
        await self.store.close()
