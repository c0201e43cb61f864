"""Admin routes of the token economics: accounts, pools, grants, statements.

Part of the admin web service (:mod:`gateway.api` mounts it, with the same bearer
authentication and the same ``{"error", "detail"}`` errors). Bodies are validated here;
the service applies each request whole or not at all.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response, params
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.api_fields import TIME, AccountId, DeviceId, WholeNumber, time_ms
from gateway.economics import PeriodRule, PoolSettings, TopUpRule, shared_pool_key
from gateway.errors import BadRequest, Conflict
from gateway.pricing import parse_share
from gateway.service import MAX_TOKENS, MeteringService

SHARE = r"^(100(\.0{1,6})?|[0-9]{1,2}(\.[0-9]{1,6})?)%$"  # 0% to 100%


Tokens = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS), WholeNumber]
PositiveTokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS), WholeNumber]


class PeriodBody(BaseModel):
    """Subscription periods: the pool resets every ``unit`` from ``anchor`` (UTC)."""

    model_config = ConfigDict(extra="forbid")
    unit: Literal["day", "week", "month"]
    anchor: Annotated[StrictStr, Field(pattern=TIME, description="RFC 3339, a date or ms")]
    tokens: Tokens = Field(description="granted at the start of every period")
    rollover_cap: Tokens = Field(default=0, description="unused tokens carried over, at most")


class TopUpBody(BaseModel):
    """Automatic top-up: grant ``tokens`` whenever the balance falls below ``floor``."""

    model_config = ConfigDict(extra="forbid")
    floor: Tokens
    tokens: PositiveTokens


class PoolBody(BaseModel):
    """A pool's settings (``PUT`` replaces them all; its running numbers are kept)."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["prepaid", "overage", "payg"] = "prepaid"
    overage_cap: Tokens = Field(default=0, description="overage policy: tokens past zero")
    period: PeriodBody | None = None
    thresholds: list[Annotated[StrictStr, Field(pattern=SHARE)]] = Field(
        default_factory=list, max_length=20, description='shares used, e.g. "80%"'
    )
    topup: TopUpBody | None = None


class GrantBody(BaseModel):
    """A grant of tokens, with an optional expiry and burn priority (lower burns first)."""

    model_config = ConfigDict(extra="forbid")
    tokens: PositiveTokens
    priority: Annotated[int, Field(strict=True, ge=0, le=1000)] = 0
    expires_at: Annotated[StrictStr | None, Field(pattern=TIME)] = None


class GrantView(BaseModel):
    seq: int
    kind: str
    tokens: int
    remaining: int
    priority: int
    expires_at: str | None
    created_at: str | None


class PeriodView(BaseModel):
    unit: str
    anchor: str | None
    tokens: int
    rollover_cap: int


class TopUpView(BaseModel):
    floor: int
    tokens: int


class PoolView(BaseModel):
    """A pool: its settings, the current period's numbers, live grants, its devices."""

    pool: Literal["shared", "dedicated"]
    account: str
    device: str | None
    policy: str
    overage_cap: int
    period: PeriodView | None
    period_start: str | None
    period_end: str | None
    allocation: int
    used: int
    balance: int
    overage: int
    settled: int
    forfeited: int
    grants: list[GrantView]
    thresholds: list[str]
    fired: list[str]
    topup: TopUpView | None
    topup_armed: bool
    devices: list[str]


class GrantResult(PoolView):
    replayed: bool = Field(description="true when an Idempotency-Key repeat credited nothing")


class AccountView(BaseModel):
    account: str
    devices: list[str]
    shared_pool: bool


def pool_settings(body: PoolBody) -> PoolSettings:
    """The service's settings from a validated body; raises BadRequest."""
    if body.policy != "overage" and body.overage_cap:
        raise BadRequest("overage_cap applies to the overage policy only")
    period = None
    if body.period is not None:
        p = body.period
        period = PeriodRule(p.unit, time_ms("period.anchor", p.anchor), p.tokens, p.rollover_cap)
    try:
        shares = tuple(parse_share(t) for t in body.thresholds)
    except ValueError as exc:
        raise BadRequest(f"thresholds: {exc}") from None
    topup = TopUpRule(body.topup.floor, body.topup.tokens) if body.topup else None
    return PoolSettings(body.policy, body.overage_cap, period, tuple(sorted(set(shares))), topup)


def build_router(service: MeteringService, auth: list[params.Depends]) -> APIRouter:
    """The routes, each behind ``auth``."""
    router = APIRouter(dependencies=auth)
    errors: dict[int | str, dict[str, Any]] = {
        404: {"description": "no such account pool or device"},
        409: {"description": "conflict"},
    }

    @router.get("/v1/accounts", response_model=list[AccountView])
    async def list_accounts() -> list[dict[str, Any]]:
        """Every account: its devices and whether it has a shared pool."""
        return service.accounts()

    @router.get("/v1/accounts/{account}/pool", response_model=PoolView, responses=errors)
    async def show_account_pool(account: AccountId) -> dict[str, Any]:
        """The account's shared pool."""
        return service.pool_view(shared_pool_key(account))

    @router.put("/v1/accounts/{account}/pool", response_model=PoolView, responses=errors)
    async def set_account_pool(account: AccountId, body: PoolBody) -> dict[str, Any]:
        """Create the account's shared pool, or replace its settings. Devices provisioned
        with ``"pool": "shared"`` draw from it."""
        key = shared_pool_key(account)
        await service.configure_pool(key, pool_settings(body), account=account)
        return service.pool_view(key)

    @router.post("/v1/accounts/{account}/grants", response_model=GrantResult, responses=errors)
    async def grant_to_account(
        account: AccountId,
        body: GrantBody,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Grant tokens to the account's shared pool: every device on it learns its new
        state. A retry with the same ``Idempotency-Key`` credits once."""
        return await _grant(shared_pool_key(account), body, idempotency_key)

    @router.get(
        "/v1/accounts/{account}/statement",
        response_class=Response,
        responses={
            200: {
                "description": "the signed statement (canonical JSON, gateway/statement.py)",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **errors,
        },
    )
    async def statement(
        account: AccountId,
        since: Annotated[str, Query(pattern=TIME, description="whole UTC hour")],
        until: Annotated[str, Query(pattern=TIME, description="whole UTC hour, exclusive")],
    ) -> Response:
        """Per device and meter, the tokens charged in ``[since, until)`` with the evidence:
        the device-signed reports at the window's boundaries, signed by the gateway.
        ``tokenwell verify`` recomputes every line offline."""
        since_ms, until_ms = time_ms("since", since), time_ms("until", until)
        body = await service.statement(account, since_ms, until_ms)
        return Response(body, media_type="application/json")

    @router.get("/v1/devices/{device_id}/allocation", response_model=PoolView, responses=errors)
    async def show_allocation(device_id: DeviceId) -> dict[str, Any]:
        """The pool the device draws from (its own, or its account's shared pool)."""
        return service.pool_view(service.device_pool(device_id))

    @router.put("/v1/devices/{device_id}/allocation", response_model=PoolView, responses=errors)
    async def set_allocation(device_id: DeviceId, body: PoolBody) -> dict[str, Any]:
        """Replace the settings of the device's dedicated allocation (a device on a shared
        pool is configured through its account: 409)."""
        key = service.device_pool(device_id)
        if key != device_id:
            raise Conflict(f"device {device_id!r} draws from its account's shared pool")
        await service.configure_pool(key, pool_settings(body))
        return service.pool_view(key)

    @router.post("/v1/devices/{device_id}/grants", response_model=GrantResult, responses=errors)
    async def grant_to_device(
        device_id: DeviceId,
        body: GrantBody,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Grant tokens to the pool the device draws from (with an expiry and priority,
        unlike a refill)."""
        return await _grant(service.device_pool(device_id), body, idempotency_key)

    async def _grant(key: str, body: GrantBody, idempotency_key: str | None) -> dict[str, Any]:
        expires = None if body.expires_at is None else time_ms("expires_at", body.expires_at)
        replayed = await service.grant(
            key,
            body.tokens,
            priority=body.priority,
            expires_ms=expires,
            idempotency_key=idempotency_key,
        )
        return {**service.pool_view(key), "replayed": replayed}

    return router
