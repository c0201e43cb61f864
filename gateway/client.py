"""A small synchronous client of the admin web service, used by the CLI and the demo.

Errors are translated once, here: an unreachable service raises
:class:`~gateway.errors.ApiUnavailable`; a 4xx/5xx reply raises :class:`ApiRefused`
carrying the service's ``{"error", "detail"}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import httpx

from gateway.config import default_db_path
from gateway.errors import ApiUnavailable, TokenwellError

DEFAULT_API_URL = "http://127.0.0.1:8080"


class ApiRefused(TokenwellError):
    """The admin API answered with an error status."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({code}, HTTP {status})")
        self.status, self.code, self.detail = status, code, detail


def find_token(explicit: str | None = None, db: Path | None = None) -> str | None:
    """The admin token: ``explicit``, ``$TOKENWELL_TOKEN``, or the file beside the ledger."""
    if explicit:
        return explicit
    if env := os.environ.get("TOKENWELL_TOKEN"):
        return env
    ledger = db or default_db_path()
    path = ledger.with_name(ledger.name + ".token")
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class AdminClient:
    """Calls the admin API at ``base_url`` with a bearer ``token``."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout: float = 10.0
    ):
        self.base_url = (base_url or os.environ.get("TOKENWELL_API") or DEFAULT_API_URL).rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"cannot reach the admin API at {self.base_url}: {exc}") from None
        if reply.status_code >= 400:
            self._refused(reply)
        return reply.json()

    @staticmethod
    def _refused(reply: httpx.Response) -> NoReturn:
        try:
            body = reply.json()
            code, detail = str(body["error"]), str(body["detail"])
        except (ValueError, KeyError, TypeError):
            code, detail = "http_error", reply.text[:200]
        raise ApiRefused(reply.status_code, code, detail)

    def add_device(
        self,
        device: str,
        public_key: str,
        tokens: int,
        account: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Provision ``device``; ``options`` are further body fields (``pool``, ``cap``,
        ``allocation``), left out when None."""
        body: dict[str, Any] = {"id": device, "public_key": public_key, "tokens": tokens}
        if account:
            body["account"] = account
        body.update((k, v) for k, v in options.items() if v is not None)
        result: dict[str, Any] = self._call("POST", "/v1/devices", json=body)
        return result

    def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/devices")
        return result

    def device(self, device: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/devices/{device}")
        return result

    def revoke(self, device: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/devices/{device}")
        return result

    def refill(
        self, device: str, tokens: int, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._call(
            "POST", f"/v1/devices/{device}/refill", json={"tokens": tokens}, headers=headers
        )
        return result

    def usage(self, **filters: str | None) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        result: dict[str, Any] = self._call("GET", "/v1/usage", params=params)
        return result

    def get(self, path: str) -> Any:
        """``GET path`` (under the API's base URL): the decoded JSON reply."""
        return self._call("GET", path)

    def get_bytes(self, path: str, params: dict[str, str]) -> bytes:
        """``GET path`` returning the reply's exact bytes (a statement is signed as is)."""
        try:
            reply = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"cannot reach the admin API at {self.base_url}: {exc}") from None
        if reply.status_code >= 400:
            self._refused(reply)
        return reply.content

    def put(self, path: str, body: dict[str, Any]) -> Any:
        """``PUT path`` with a JSON body: the decoded JSON reply."""
        return self._call("PUT", path, json=body)

    def post(self, path: str, body: dict[str, Any], idempotency_key: str | None = None) -> Any:
        """``POST path`` with a JSON body (and an ``Idempotency-Key``): the JSON reply."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", path, json=body, headers=headers)

    def gateway_key(self) -> str:
        return str(self._call("GET", "/v1/gateway")["public_key"])
