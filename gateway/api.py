"""The one place the web framework is used: the admin web service (contract §7).

FastAPI generates ``/openapi.json`` from the models below. Every ``/v1`` call requires
``Authorization: Bearer <token>``. Errors are ``{"error": code, "detail": text}`` with a
fitting status; an operation either applies whole or not at all (the service commits
before it changes anything visible).
"""

from __future__ import annotations

import csv
import hmac
import io
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException

from gateway.api_accounts import PoolBody, build_router, pool_settings
from gateway.api_fields import DeviceId, WholeNumber
from gateway.errors import AdminError, BadRequest, LedgerError
from gateway.ledger import UsageQuery, UsageRow
from gateway.service import MAX_TOKENS, MeteringService
from gateway.views import parse_time, rfc3339
from gateway.wire import is_usable_public_key

VERSION = "0.1.0"


class NewDevice(BaseModel):
    """``POST /v1/devices``: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    id: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    public_key: Annotated[
        StrictStr,
        Field(pattern=r"^[0-9A-Fa-f]{64}$", description="Ed25519 public key, 32 bytes in hex"),
    ]
    tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS), WholeNumber]
    account: Annotated[
        StrictStr | None,
        Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"),
    ] = None
    pool: Literal["dedicated", "shared"] = Field(
        default="dedicated",
        description="draw from its own allocation, or from the account's shared pool",
    )
    cap: Annotated[int | None, Field(strict=True, ge=0, le=MAX_TOKENS), WholeNumber] = Field(
        default=None, description="shared pool only: tokens per period, at most"
    )
    allocation: PoolBody | None = Field(
        default=None, description="dedicated pool only: policy, period, alerts, top-up"
    )


class Refill(BaseModel):
    """``POST /v1/devices/{id}/refill``."""

    model_config = ConfigDict(extra="ignore")
    tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS), WholeNumber]


class DeviceView(BaseModel):
    """A device as on its retained fleet topic (contract §6)."""

    device: str
    account: str
    state: str
    rate_permille: int
    balance: int
    allocation: int
    used: int
    pool: Literal["dedicated", "shared"]
    policy: str
    cap: int | None
    pool_balance: int
    pool_used: int
    overage: int
    period_start: str | None
    period_end: str | None
    revoked: bool
    public_key: str
    control_seq: int
    created_at: str | None
    last_report_at: str | None
    updated_at: str | None


class RefillResult(DeviceView):
    replayed: bool = Field(description="true when an Idempotency-Key repeat credited nothing")


class UsageLine(BaseModel):
    bucket: str | None
    device: str
    account: str
    meter: str
    units: int
    tokens: int
    overage: int = Field(description="of the tokens, those past the pool's zero (billed)")


class UsageReply(BaseModel):
    since: str | None
    until: str | None
    bucket: str
    rows: list[UsageLine]
    total_tokens: int
    total_overage: int


_USAGE_COLUMNS = ("bucket_start", "device", "account", "meter", "units", "tokens", "overage")
_USAGE_CSV: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON by default; with format=csv, the rows as RFC 4180 CSV under a"
        " header row (bucket_start empty for bucket=all), no totals",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


class GatewayInfo(BaseModel):
    public_key: str
    version: str


class ErrorReply(BaseModel):
    error: str
    detail: str


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def build_api(service: MeteringService, token: str, gateway_key_hex: str) -> FastAPI:
    """The admin application for ``service``, guarded by ``token``."""
    app = FastAPI(
        title="Tokenwell admin API",
        version=VERSION,
        description="Provisioning, refills and usage of metered devices.",
        responses={401: {"model": ErrorReply}, 422: {"model": ErrorReply}},
    )
    _install_error_handlers(app)
    expected = token.encode()

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong bearer token")

    auth = [Depends(authorized)]
    app.include_router(build_router(service, auth))

    @app.post("/v1/devices", status_code=201, dependencies=auth, response_model=DeviceView,
              responses={404: {"model": ErrorReply}, 409: {"model": ErrorReply}})  # fmt: skip
    async def add_device(body: NewDevice) -> dict[str, Any]:
        """Provision a device with an initial allocation of tokens."""
        key = _public_key(body.public_key)
        if body.pool == "dedicated" and body.cap is not None:
            raise BadRequest("cap applies to a device on a shared pool")
        settings = None if body.allocation is None else pool_settings(body.allocation)
        device = await service.provision(
            body.id, key, body.tokens, body.account,
            shared=body.pool == "shared", cap=body.cap, settings=settings,
        )  # fmt: skip
        return service.state(device.id)

    @app.get("/v1/devices", dependencies=auth, response_model=list[DeviceView])
    async def list_devices() -> list[dict[str, Any]]:
        """Every device, as on the fleet state topics."""
        return [service.state(d.id) for d in service.devices()]

    @app.get("/v1/devices/{device_id}", dependencies=auth, response_model=DeviceView,
             responses={404: {"model": ErrorReply}})  # fmt: skip
    async def show_device(device_id: DeviceId) -> dict[str, Any]:
        """One device, as on its fleet state topic."""
        return service.state(device_id)

    @app.post("/v1/devices/{device_id}/refill", dependencies=auth, response_model=RefillResult,
              responses={404: {"model": ErrorReply}, 409: {"model": ErrorReply}})  # fmt: skip
    async def refill(
        device_id: DeviceId,
        body: Refill,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Add tokens. A retry with the same ``Idempotency-Key`` credits once."""
        device, replayed = await service.refill(device_id, body.tokens, idempotency_key)
        return {**service.state(device.id), "replayed": replayed}

    @app.delete("/v1/devices/{device_id}", dependencies=auth, response_model=DeviceView,
                responses={404: {"model": ErrorReply}})  # fmt: skip
    async def revoke(device_id: DeviceId) -> dict[str, Any]:
        """Revoke: further reports are rejected and the device is sent ``block``."""
        return service.state((await service.revoke(device_id)).id)

    @app.get("/v1/usage", dependencies=auth, response_model=UsageReply, responses=_USAGE_CSV)
    async def usage(
        device: DeviceId | None = None,
        account: DeviceId | None = None,
        meter: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,32}$")] = None,
        since: Annotated[str | None, Query(description="RFC 3339, a date, or ms")] = None,
        until: Annotated[
            str | None, Query(description="exclusive; RFC 3339, a date, or ms")
        ] = None,
        bucket: Literal["hour", "day", "month", "all"] = "all",
        output: Annotated[
            Literal["json", "csv"], Query(alias="format", description="json (default) or csv")
        ] = "json",
    ) -> dict[str, Any] | Response:
        """Who used what over what time frame: units and tokens per device and meter, each
        bucket keyed by its start in attributed time (the device clock when plausible, else
        the time of receipt)."""
        since_ms, until_ms = _time_param("since", since), _time_param("until", until)
        query = UsageQuery(device, account, meter, since_ms, until_ms, bucket)
        rows = await service.usage(query)
        if output == "csv":
            return Response(_usage_csv(rows), media_type="text/csv; charset=utf-8")
        return {
            "since": rfc3339(since_ms),
            "until": rfc3339(until_ms),
            "bucket": bucket,
            "rows": [
                {
                    "bucket": rfc3339(r.bucket_start_ms),
                    "device": r.device,
                    "account": r.account,
                    "meter": r.meter,
                    "units": r.units,
                    "tokens": r.tokens,
                    "overage": r.overage,
                }
                for r in rows
            ],
            "total_tokens": sum(r.tokens for r in rows),
            "total_overage": sum(r.overage for r in rows),
        }

    @app.get("/v1/gateway", dependencies=auth, response_model=GatewayInfo)
    async def gateway_info() -> dict[str, str]:
        """The public key that signs control messages."""
        return {"public_key": gateway_key_hex, "version": VERSION}

    @app.get("/healthz", responses={503: {"description": "ledger commits are failing"}})
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the ledger commits; 503 while commits are failing."""
        healthy = service.ledger_healthy
        body = {
            "status": "ok" if healthy else "ledger_failing",
            "devices": len(service.registry.devices),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _public_key(text: str) -> bytes:

    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BadRequest("public_key must be hex") from None
    if len(raw) != 32:
        raise BadRequest("public_key must be 32 bytes (64 hex digits)")
    if not is_usable_public_key(raw):
        raise BadRequest(
            "public_key is not a usable Ed25519 key (a small-order or non-canonical point:"
            " signatures with it would prove nothing)"
        )
    return raw


def _time_param(name: str, text: str | None) -> int | None:

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise BadRequest(f"{name}: want RFC 3339, a date or ms since the epoch") from None


def _usage_csv(rows: list[UsageRow]) -> str:
    """``rows`` as RFC 4180 CSV (CRLF line ends, quoted where needed) under a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(_USAGE_COLUMNS)
    for r in rows:
        start = rfc3339(r.bucket_start_ms) or ""
        writer.writerow((start, r.device, r.account, r.meter, r.units, r.tokens, r.overage))
    return out.getvalue()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AdminError)
    async def admin_error(request: Request, exc: AdminError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(LedgerError)
    async def ledger_error(request: Request, exc: LedgerError) -> JSONResponse:
        return _error(503, "ledger_unavailable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
