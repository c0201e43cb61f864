"""The metering service: the report pipeline and the admin operations around one state.

Flow of a report (docs/architecture.md):

    receiver process (paho, signatures) ──frames──▶ inbox ──▶ verify stage
        ──▶ charge stage: charge_batch (pure, on committed + staged state)
        ──▶ commit stage: ledger.commit (one transaction, group commit)
        ▶ registry.apply ▶ acks to the receiver (in order) ▶ control messages, events
        ▶ fleet state (coalesced, every 500 ms)

Acknowledgement strictly follows the commit: a gateway killed at any instant leaves
every unacknowledged report with the broker, which redelivers it on reconnect (the
persistent session), and the charging rule makes a redelivered report debit nothing
twice. A commit that fails is retried with back-off; nothing is acknowledged meanwhile.

Admin operations (provision, refill, revoke) take the same lock as the charge stage, so
they are ordered with batches, and are likewise commit first, then publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.economics import (
    GrantKind,
    Outcome,
    Pool,
    PoolSettings,
    advance,
    configure,
    credit,
    shared_pool_key,
)
from gateway.errors import BadRequest, Conflict, LedgerError, NotFound
from gateway.flood import FloodMonitor
from gateway.ingest import (
    BatchResult,
    Pricing,
    Registry,
    Rejected,
    Staged,
    charge_batch,
    pass_time,
    rebalance,
    verify,
)
from gateway.ledger import Ledger, LedgerWrite, UsageQuery, UsageRow
from gateway.metering import Device, next_control
from gateway.metrics import STAGES, Metrics
from gateway.mqtt import Incoming
from gateway.statement import StatementError, build_statement
from gateway.topics import Topics
from gateway.views import Event, device_state, pool_view, state_json
from gateway.wire import ControlMessage, UsageReport, is_device_id, sign_control
from gateway.workers import Workers

log = logging.getLogger("tokenwell.gateway")

Clock = Callable[[], int]  # milliseconds since the Unix epoch
MAX_BATCH = 1000
MAX_GROUP = 8  # charged batches waiting for the commit stage, at most; committed together
MAX_REJECTED_EVENTS = 200  # rejected events published a second; the rest only counted
MAX_UNCONFIRMED = 2000  # retained publishes in flight before the fleet-state flush waits
INLINE_VERIFY = 32  # below this many messages, verifying on the loop beats a thread hop
MAX_ALLOCATION = 2**62  # balances and sums stay far inside SQLite's 64-bit integers
MAX_TOKENS = 10**15  # per request; far below 2**63 so sums of many stay in range


class Charged(NamedTuple):
    """A batch handed from the charge stage to the commit stage."""

    batch: list[Incoming]
    result: BatchResult
    at: float  # time.perf_counter() when it was charged


class Publisher(Protocol):
    """What the service needs to publish (see gateway.mqtt)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int: ...

    @property
    def unconfirmed(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet."""
        ...


class Intake(Protocol):
    """What the service needs from what receives reports (see gateway.receiver)."""

    def ack(self, message: Incoming) -> None: ...

    def add_key(self, device: str, public_key: bytes) -> None:
        """A device was added: its reports can be vouched for from now on."""
        ...


class MeteringService:
    """Owns the registry; the only writer of the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        pricing: Pricing,
        topics: Topics,
        signing_key: Ed25519PrivateKey,
        clock: Clock,
        metrics: Metrics | None = None,
        flood_limit: int = 20,
    ) -> None:
        self.ledger = ledger
        self.pricing = pricing
        self.topics = topics
        self.registry = Registry()
        self.metrics = metrics or Metrics()
        self._key = signing_key
        self._clock = clock
        self._lock = asyncio.Lock()
        self._mqtt: Publisher | None = None
        self._receiver: Intake | None = None
        self._dirty: set[str] = set()
        self._republish: set[str] = set()
        self._pending_controls: dict[int, tuple[str, int]] = {}
        self._unconfirmed: list[str] = []  # loaded devices with an unconfirmed control
        self._announced_unpriced: set[tuple[str, str]] = set()
        self._floods = FloodMonitor(flood_limit)
        self._rejected_events = (0, 0)  # (second, rejected events published in it)
        self._workers = Workers("verify")
        self.inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        self._verified: asyncio.Queue[tuple[list[Incoming], list[UsageReport | Rejected]]]
        self._verified = asyncio.Queue(maxsize=2)
        self._staged = Staged(self.registry)
        self._idle = asyncio.Event()  # set while no batch is charged and uncommitted
        self._idle.set()
        self._charged: asyncio.Queue[Charged] = asyncio.Queue(maxsize=MAX_GROUP)
        self._stage = {name: self.metrics.stage_seconds.labels(name) for name in STAGES}
        self.committed = asyncio.Condition()  # notified after every committed batch
        self.charged = asyncio.Condition()  # notified after every charged (staged) batch
        self.ledger_healthy = True
        self.backlog_high_water = 0  # most reports ever held unacknowledged at once
        self.processed = 0  # reports committed and acknowledged, whatever their outcome

    # --- start-up -------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the in-memory registry from the ledger (packed: no record is built)."""
        snapshot = await self.ledger.load_packed()
        loaded = self.registry.load(snapshot.devices, snapshot.pools)
        self._dirty.update(self.registry.devices)
        self._unconfirmed = loaded.unconfirmed
        self.metrics.devices.set(loaded.active)

    def attach(self, mqtt: Publisher, receiver: Intake) -> None:
        """Connect the service to MQTT: ``mqtt`` publishes, ``receiver`` acknowledges the
        reports it delivered into :attr:`inbox`. Re-send at once the control messages the
        broker never confirmed, and queue every other retained message for re-publishing
        (see :meth:`reconnected`): a broker that crashed while we were down may have lost
        them.
        """
        self._mqtt, self._receiver = mqtt, receiver
        for device_id in self._unconfirmed:
            device = self.registry.devices[device_id]
            if device.control is not None and device.control.seq > device.control_sent:
                self._publish_control(device.control)
        self._unconfirmed = []
        self.reconnected()

    def reconnected(self) -> None:
        """After a reconnect, re-publish every retained message (a crashed broker may have
        lost them since its last save): the current control messages, byte-identical
        (same ``n``), and the fleet state. Spread over the fleet-state ticks."""
        self._republish.update(self.registry.devices)
        self._dirty.update(self.registry.devices)

    # --- the pipeline -------------------------------------------------------------

    async def verify_stage(self, stopping: asyncio.Event) -> None:
        """Take received messages in batches, verify them, hand them to the charge stage."""
        while not stopping.is_set():
            first = await _get_or_stop(self.inbox, stopping)
            if first is None:
                break
            taken, batch = time.perf_counter(), [first]
            while len(batch) < MAX_BATCH and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            backlog = self.inbox.qsize() + len(batch)
            self.metrics.backlog.set(backlog)
            self.backlog_high_water = max(self.backlog_high_water, backlog)
            devices = (self.topics.device_of_usage(m.topic) or "" for m in batch)
            self._announce_floods(self._floods.observe(devices, self._clock()))
            verdicts = await self._verify(batch)
            self._stage["verify"].observe(time.perf_counter() - taken)
            await self._verified.put((batch, verdicts))
        await self._verified.put(([], []))  # tells the charge stage to finish

    def _announce_floods(self, devices: list[str]) -> None:
        now = self._clock()
        for device in devices:
            limit = self._floods.limit
            log.warning("device %r sends more than %d reports a second", device, limit)
            self.metrics.floods.inc()
            self.publish_event(Event("flood", device[:64], now, {"limit_per_second": limit}))

    async def _verify(self, batch: list[Incoming]) -> list[UsageReport | Rejected]:
        """Verify a batch, in order: what the receiver vouched for on the loop (no
        signature to check), the rest on worker threads."""
        device_of, registry = self.topics.device_of_usage, self.registry
        unvouched = [m for m in batch if m.vouched_by is None]
        self.metrics.vouched.inc(len(batch) - len(unvouched))
        checked = iter(await self._verify_in_threads(unvouched) if unvouched else ())
        return [
            next(checked)
            if m.vouched_by is None
            else verify(device_of(m.topic), m.payload, registry, vouched_by=m.vouched_by)
            for m in batch
        ]

    async def _verify_in_threads(self, batch: list[Incoming]) -> list[UsageReport | Rejected]:
        items = [(self.topics.device_of_usage(m.topic), m.payload) for m in batch]
        registry = self.registry
        return await self._workers.map(
            lambda chunk: _verify_all(chunk, registry), items, inline=INLINE_VERIFY
        )

    async def charge_stage(self) -> None:
        """Charge batch after batch, in order, against the committed state plus what is
        still committing (:class:`~gateway.ingest.Staged`), and hand each to the commit
        stage: batch N+1 is charged while batch N commits."""
        while True:
            batch, items = await self._verified.get()
            if not batch:
                break
            async with self._lock:
                started = time.perf_counter()
                payloads = [message.payload for message in batch]
                now = self._clock()
                result = charge_batch(items, self._staged, self.pricing, now, payloads)
                self._staged.stage(result)
                self._idle.clear()
                charged_at = time.perf_counter()
                self._stage["charge"].observe(charged_at - started)
            async with self.charged:
                self.charged.notify_all()
            await self._charged.put(Charged(batch, result, charged_at))
        await self._charged.put(Charged([], BatchResult(), 0.0))  # the commit stage's end

    async def commit_stage(self, stopping: asyncio.Event) -> None:
        """Commit charged batches, in order; only then make each visible, acknowledge its
        reports and publish its control messages. Batches that are waiting when a commit
        starts go into it together (one transaction, one fsync). Ends once the charge
        stage has ended and everything it charged is committed."""
        finished = False
        while not finished:
            group = [await self._charged.get()]
            while not self._charged.empty() and len(group) < MAX_GROUP:
                group.append(self._charged.get_nowait())
            finished = not group[-1].batch  # the charge stage's last word, always last
            if finished:
                group.pop()
            if not group:
                continue
            begun = time.perf_counter()
            for charged in group:
                self._stage["queued"].observe(begun - charged.at)
            write = LedgerWrite.combined([c.result.write for c in group])
            await self._commit(write, stopping)
            committed_at = time.perf_counter()
            packed = write.packed_pools()
            for charged in group:
                devices, pools = charged.result.devices, charged.result.pools.values()
                self.registry.apply(devices, pools, packed)  # pools packed once, for both
                self._staged.unstage(charged.result)
            if not self._staged.batches:
                self._idle.set()
            assert self._receiver is not None
            for batch, result, _ in group:
                for message in batch:
                    self._receiver.ack(message)
                self.processed += len(batch)
                self._after_batch(result, len(batch))
            self._stage["publish"].observe(time.perf_counter() - committed_at)
            async with self.committed:
                self.committed.notify_all()

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the service for an admin operation: no batch is charged meanwhile, and
        every batch already charged is committed first (the registry is then the whole
        truth, and an admin write cannot be overwritten by a batch charged before it)."""
        async with self._lock:
            await self._idle.wait()
            yield

    async def _commit(self, write: LedgerWrite, stopping: asyncio.Event) -> None:
        """Commit, retrying with back-off until it succeeds (nothing is acked before).

        Raises :class:`LedgerError` if it still fails once ``stopping`` is set: the
        gateway then exits non-zero with the batch unacknowledged, for the broker to
        redeliver to the next run.
        """
        delay = 0.05
        while True:
            try:
                with self.metrics.commit_seconds.time():
                    await self.ledger.commit(write)
            except LedgerError as exc:
                self.ledger_healthy = False
                self.metrics.commit_failures.inc()
                if stopping.is_set():
                    raise
                log.error("ledger commit failed, retrying in %.2fs: %s", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 5.0)
            else:
                self.ledger_healthy = True
                return

    def _after_batch(self, result: BatchResult, received: int) -> None:
        m = self.metrics
        m.batch_size.observe(received)
        m.reports.labels("charged").inc(result.charged)
        m.reports.labels("duplicate").inc(result.duplicates)
        m.reports.labels("rejected").inc(len(result.rejected))
        m.tokens_debited.inc(result.tokens)
        for item in result.rejected:
            m.rejected.labels(item.rejection.reason.value).inc()
        for control in result.controls:
            self._publish_control(control)
        for event in result.events:
            if event.type == "unpriced_meter":
                key = (event.device, str(event.details["meter"]))
                if key in self._announced_unpriced:
                    continue
                self._announced_unpriced.add(key)
            self.publish_event(event)
        self._dirty.update(result.devices)
        m.backlog.set(self.inbox.qsize())

    # --- publishing -----------------------------------------------------------------

    def _publish_control(self, control: ControlMessage) -> None:
        if self._mqtt is None:
            return
        payload = sign_control(control, self._key)
        mid = self._mqtt.publish(self.topics.control(control.device), payload, retain=True)
        self._pending_controls[mid] = (control.device, control.seq)
        self.metrics.controls.labels(control.state).inc()

    def control_published(self, mid: int) -> None:
        """The broker confirmed a publish: remember which control ``n`` it delivered.

        The mark is persisted with the device's next write; a crash before that only
        means the same message (same ``n``) is published once more at start-up.
        """
        sent = self._pending_controls.pop(mid, None)
        if sent is None:
            return
        if not self._pending_controls:  # a dict keeps its largest table: 5 MB after a start
            self._pending_controls = {}
        device = self.registry.devices.get(sent[0])
        if device is not None and device.control_sent < sent[1]:
            self.registry.devices[device.id] = device._replace(control_sent=sent[1])

    def publish_event(self, event: Event) -> None:
        """Publish an operator event. ``rejected`` events are limited to
        ``MAX_REJECTED_EVENTS`` a second: a stream of junk must not turn into an equal
        stream of events (they stay counted in ``/metrics``, by reason)."""
        self.metrics.events.labels(event.type).inc()
        if event.type == "rejected" and not self._rejected_budget(event.at_ms):
            self.metrics.events_suppressed.inc()
            return
        if self._mqtt is not None:
            self._mqtt.publish(self.topics.event(event.type), event.to_json())

    def _rejected_budget(self, now_ms: int) -> bool:
        second, used = self._rejected_events
        if now_ms // 1000 != second:
            second, used = now_ms // 1000, 0
        self._rejected_events = (second, used + 1)
        return used < MAX_REJECTED_EVENTS

    @property
    def fleet_state_due(self) -> int:
        """How many retained messages :meth:`flush_fleet_state` has to publish."""
        return len(self._republish) + len(self._dirty)

    def flush_fleet_state(self, limit: int = 5000) -> int:
        """Publish up to ``limit`` retained messages due (controls to re-publish, then the
        state of changed devices); returns how many.

        Publishes nothing while more than ``MAX_UNCONFIRMED`` publishes await the broker's
        acknowledgement: what is due stays a device id in a set (bytes), not a queued
        message (a kilobyte) — 100,000 at start-up would otherwise cost 100 MB at once.
        """
        if self._mqtt is None:
            return 0
        limit = min(limit, MAX_UNCONFIRMED - self._mqtt.unconfirmed)
        count = 0
        while self._republish and count < limit:
            device = self.registry.devices.get(self._republish.pop())
            if device is not None and device.control is not None:
                self._publish_control(device.control)
                count += 1
        while self._dirty and count < limit:
            device = self.registry.devices.get(self._dirty.pop())
            if device is not None:
                state = state_json(device, self.registry.pool_of(device))
                self._mqtt.publish(self.topics.fleet_device(device.id), state, retain=True)
                count += 1
        if not self._republish:  # a set keeps its largest table: 4 MB after a start
            self._republish = set()
        if not self._dirty:
            self._dirty = set()
        return count

    # --- admin operations -----------------------------------------------------------

    async def provision(
        self,
        device_id: str,
        public_key: bytes,
        tokens: int,
        account: str | None,
        *,
        shared: bool = False,
        cap: int | None = None,
        settings: PoolSettings | None = None,
    ) -> Device:
        """Add a device with an initial allocation; raises Conflict if the id exists.

        A device draws from its own dedicated pool (``tokens`` is its initial grant; an
        optional ``settings`` sets its policy, period, alerts and top-up) or, ``shared``,
        from its account's pool (which must exist; ``tokens`` must be 0), optionally
        limited to ``cap`` tokens per period.
        """
        _check_tokens(tokens, allow_zero=True)
        if not is_device_id(device_id):
            raise BadRequest("id must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
        account = account or device_id
        if not is_device_id(account):
            raise BadRequest("account must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
        if cap is not None:
            _check_tokens(cap, allow_zero=True, name="cap")
        if shared and (tokens or settings is not None):
            raise BadRequest("a device on its account's shared pool takes no tokens or policy:"
                             " grant them to the account's pool")  # fmt: skip
        async with self._exclusive():
            if device_id in self.registry.devices:
                raise Conflict(f"device {device_id!r} already exists")
            now = self._clock()
            write = LedgerWrite()
            if shared:
                pool = self._existing_pool(shared_pool_key(account))
            else:
                configured = configure(Pool(device_id, account), settings or PoolSettings(), now)
                outcome = credit(configured, tokens, now, kind="initial")
                pool = outcome.pool
                write.pools.append(pool)
                write.movements.extend(outcome.movements)
            device = Device(
                device_id, public_key, account, pool.key, 0, now, now,
                cap=cap, period_ms=pool.period_start_ms,
            )  # fmt: skip
            control = next_control(
                device, pool, self.pricing.ladder, now, why="provisioned", force=True
            )
            device = device._replace(control=control)
            write.devices.append(device)
            await self._commit_admin(write)
            if self._receiver is not None:
                self._receiver.add_key(device_id, public_key)
            self.metrics.devices.inc()
            self.metrics.tokens_granted.inc(tokens)
        self._announce(
            device, Event("device_added", device_id, now, {"tokens": tokens, "account": account})
        )
        return device

    async def refill(
        self, device_id: str, tokens: int, idempotency_key: str | None
    ) -> tuple[Device, bool]:
        """Credit ``tokens`` to the device's pool (for a device on a shared pool, the
        account's: every device drawing from it learns its new balance); returns the
        device and whether this was a replayed request.

        A retried request with the same ``Idempotency-Key`` credits nothing more; the
        same key with a different amount is a Conflict.
        """
        device = self._existing(device_id)
        if device.revoked:
            # An earlier refill's replay still answers (below), a new one is refused.
            earlier = None
            if idempotency_key is not None:
                earlier = await self.ledger.find_grant(device.pool, idempotency_key)
            if earlier is None:
                raise Conflict(f"device {device_id!r} is revoked")
        replayed = await self.grant(
            device.pool, tokens, idempotency_key=idempotency_key, kind="refill", device=device_id
        )
        return self._existing(device_id), replayed

    async def grant(
        self,
        pool_key: str,
        tokens: int,
        *,
        priority: int = 0,
        expires_ms: int | None = None,
        idempotency_key: str | None = None,
        kind: GrantKind = "grant",
        device: str | None = None,
    ) -> bool:
        """Grant ``tokens`` to pool ``pool_key``; returns True for a replayed request (same
        ``Idempotency-Key`` and amount: nothing credited). Every device on the pool is
        sent its new state."""
        _check_tokens(tokens, allow_zero=False)
        if type(priority) is not int or not 0 <= priority <= 1000:
            raise BadRequest("priority must be a whole number from 0 to 1000")
        async with self._exclusive():
            pool = self._existing_pool(pool_key)
            if idempotency_key is not None:
                earlier = await self.ledger.find_grant(pool_key, idempotency_key)
                if earlier is not None:
                    if earlier.tokens != tokens:
                        raise Conflict("Idempotency-Key was used for a different grant")
                    return True
            now = self._clock()
            if expires_ms is not None and expires_ms <= now:
                raise BadRequest("expires_at must be in the future")
            if pool.allocation + tokens > MAX_ALLOCATION:
                raise BadRequest(f"the allocation would exceed {MAX_ALLOCATION} tokens")
            current = advance(pool, now)
            outcome = current.then(
                credit(current.pool, tokens, now, kind=kind, priority=priority,
                       expires_ms=expires_ms, idempotency_key=idempotency_key)
            )  # fmt: skip
            result = rebalance(self.registry, self.pricing, now, outcome, why="refill")
            await self._commit_admin(result.write)
            self.metrics.tokens_granted.inc(tokens)
        details = {"tokens": tokens, "pool": pool_key, "balance": outcome.pool.balance}
        self._publish_result(result, Event("refill", device or pool.account, now, details))
        return False

    async def configure_pool(
        self, pool_key: str, settings: PoolSettings, *, account: str | None = None
    ) -> Pool:
        """Set a pool's policy, period, alerts and top-up; creates an account's shared pool
        (``account`` given) when it does not exist yet. Devices on it are re-evaluated."""
        async with self._exclusive():
            now = self._clock()
            existing = self.registry.pools.get(pool_key)
            if existing is None:
                if account is None:
                    raise NotFound(f"no pool {pool_key!r}")
                existing = Pool(pool_key, account)
            current = advance(existing, now)
            outcome = current.then(Outcome(configure(current.pool, settings, now)))
            result = rebalance(self.registry, self.pricing, now, outcome, why=None)
            await self._commit_admin(result.write)
        self._publish_result(result)
        return outcome.pool

    async def revoke(self, device_id: str) -> Device:
        """Revoke a device: its reports are rejected from now on and it is sent ``block``."""
        async with self._exclusive():
            device = self._existing(device_id)
            if device.revoked:
                return device
            now = self._clock()
            device = device._replace(revoked=True, updated_ms=now)
            pool = self.registry.pool_of(device)
            control = next_control(device, pool, self.pricing.ladder, now, force=True)
            device = device._replace(control=control)
            await self._commit_admin(LedgerWrite(devices=[device]))
            self.metrics.devices.dec()
        self._announce(device, Event("device_revoked", device_id, now))
        return device

    async def pass_time(self) -> None:
        """Apply grant expiries and period resets that are due, with their control
        messages (``period_reset``) and events. Called every fleet-state interval; a
        failing commit leaves them due for the next call."""
        now = self._clock()
        due = self.registry.due_pools(now)
        if not due:
            return
        async with self._exclusive():
            result = pass_time(self.registry, self.pricing, now, due)
            try:
                await self._commit_admin(result.write)
            except LedgerError as exc:  # still due: retried at the next tick
                log.error("ledger commit failed for expiries and period resets: %s", exc)
                return
        self._publish_result(result)

    def _publish_result(self, result: BatchResult, *events: Event) -> None:
        for control in result.controls:
            self._publish_control(control)
        for event in (*events, *result.events):
            self.publish_event(event)
        self._dirty.update(result.devices)

    def _existing(self, device_id: str) -> Device:
        device = self.registry.devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def _existing_pool(self, pool_key: str) -> Pool:
        pool = self.registry.pools.get(pool_key)
        if pool is None:
            if pool_key.startswith("@"):
                raise NotFound(f"account {pool_key[1:]!r} has no shared pool")
            raise NotFound(f"no device {pool_key!r}")
        return pool

    def pool_view(self, pool_key: str) -> dict[str, object]:
        """A pool as the admin API shows it; raises NotFound."""
        return pool_view(self._existing_pool(pool_key), self.registry.members_of(pool_key))

    def device_pool(self, device_id: str) -> str:
        """The key of the pool ``device_id`` draws from; raises NotFound."""
        return self._existing(device_id).pool

    async def statement(self, account: str, since_ms: int, until_ms: int) -> bytes:
        """The signed, verifiable statement of ``account`` for ``[since_ms, until_ms)``
        (whole UTC hours; see :mod:`gateway.statement`). Raises NotFound for an account
        without devices, BadRequest for a bad window, Conflict when the stored evidence
        would not verify."""
        keys = {i: s.public_key for i, s in self.registry.summaries() if s.account == account}
        if not keys:
            raise NotFound(f"no account {account!r}")
        ids = list(keys)
        evidence = [
            *await self.ledger.evidence(ids, since_ms),
            *await self.ledger.evidence(ids, until_ms),
        ]
        try:
            return build_statement(
                account=account, since_ms=since_ms, until_ms=until_ms,
                public_keys=keys,
                prices=self.pricing.prices, evidence=evidence,
                generated_ms=self._clock(), gateway_key=self._key,
            )  # fmt: skip
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except StatementError as exc:
            raise Conflict(f"the stored evidence would not verify: {exc}") from None

    def accounts(self) -> list[dict[str, object]]:
        """Every account (of a device or a shared pool): its devices and whether it has a
        shared pool."""
        devices: dict[str, list[str]] = {}
        for device_id, summary in self.registry.summaries():
            devices.setdefault(summary.account, []).append(device_id)
        for key in self.registry.pools:
            if key not in self.registry.devices:  # a shared pool (a dedicated one has its device)
                devices.setdefault(self.registry.pools[key].account, [])
        return [
            {
                "account": account,
                "devices": sorted(ids),
                "shared_pool": shared_pool_key(account) in self.registry.pools,
            }
            for account, ids in sorted(devices.items())
        ]

    def state(self, device_id: str) -> dict[str, object]:
        """The device's fleet-state document."""
        device = self._existing(device_id)
        return device_state(device, self.registry.pool_of(device))

    async def _commit_admin(self, write: LedgerWrite) -> None:
        await self.ledger.commit(write)  # a LedgerError surfaces to the caller: nothing applied
        self.registry.apply({d.id: d for d in write.devices}, write.pools, write.packed_pools())

    def _announce(self, device: Device, *events: Event) -> None:
        if device.control is not None and device.control.seq > device.control_sent:
            self._publish_control(device.control)
        for event in events:
            self.publish_event(event)
        self._dirty.add(device.id)

    def device(self, device_id: str) -> Device:
        """The device's current record; raises NotFound."""
        return self._existing(device_id)

    def public_keys(self) -> Iterator[tuple[str, bytes]]:
        """Every device's id and public key (revoked devices' too)."""
        yield from self.registry.public_keys()

    def devices(self) -> list[Device]:
        return sorted(self.registry.devices.values(), key=lambda d: d.id)

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        return await self.ledger.usage(query)

    def close(self) -> None:
        self._workers.close()


def _verify_all(
    items: Sequence[tuple[str | None, bytes]], registry: Registry
) -> list[UsageReport | Rejected]:
    return [verify(device_id, payload, registry) for device_id, payload in items]


def _check_tokens(tokens: object, *, allow_zero: bool, name: str = "tokens") -> None:
    if type(tokens) is not int or tokens < (0 if allow_zero else 1) or tokens > MAX_TOKENS:
        low = 0 if allow_zero else 1
        raise BadRequest(f"{name} must be a whole number from {low} to {MAX_TOKENS}")


async def _get_or_stop(queue: asyncio.Queue[Incoming], stopping: asyncio.Event) -> Incoming | None:
    """The next item, or None once ``stopping`` is set (items left stay unacknowledged)."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if getter in done:
        return getter.result()
    getter.cancel()
    return None
