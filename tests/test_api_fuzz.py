"""Fuzz the admin API from its own OpenAPI document (schemathesis), over real HTTP against a
real gateway process: no request yields a 500, and nothing is ever half-applied."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from gateway.sqlite_ledger import SqliteLedger
from tests.helpers import TOKEN, GatewayProcess, assert_conserved

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = 'topic_prefix = "fuzz/v1"\nclient_id = "fuzz-gateway"\n[meters]\napi_calls = "0.01"\n'


@pytest.fixture(scope="module")
def fuzzed_gateway(
    shared_broker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("fuzz")
    gateway = GatewayProcess.prepare(shared_broker.url, folder, CONFIG)
    gateway.start()
    yield gateway
    assert gateway.terminate() == 0


def test_no_request_yields_a_server_error_or_breaks_the_contract(
    fuzzed_gateway: GatewayProcess,
) -> None:
    """Every operation, with generated valid and invalid inputs, checked by schemathesis's
    default checks (no 5xx, status codes, content types and bodies as documented)."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_gateway.api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        # Some valid-looking inputs are checked beyond the schema, and a 422 is fair:
        # since/until/anchor/expires_at are free-form times (an impossible date, an expiry
        # in the past, a statement not on whole hours), and pool settings and device pool
        # choices combine (overage_cap only under the overage policy, a cap only on a
        # shared pool, no tokens there).
        beyond_schema = (
            operation.path == "/v1/usage"
            or operation.path.endswith(("/pool", "/allocation", "/grants", "/statement"))
            or (operation.path, operation.method.upper()) == ("/v1/devices", "POST")
        )
        lenient = [positive_data_acceptance] if beyond_schema else []
        fuzz(operation, lenient)


def fuzz(operation: Any, excluded_checks: list[Any]) -> None:
    """Run schemathesis's generated cases for one operation."""

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def call(case: Any) -> None:
        case.call_and_validate(headers=AUTH, excluded_checks=excluded_checks)

    call()


def test_after_fuzzing_every_balance_still_equals_its_entries(
    fuzzed_gateway: GatewayProcess,
) -> None:
    """Whatever the fuzzer sent, the ledger's invariant holds for every device."""
    db = Path(fuzzed_gateway.args[fuzzed_gateway.args.index("--db") + 1])

    async def check() -> int:
        ledger = SqliteLedger(db)
        await ledger.open()
        try:
            snapshot = await assert_conserved(ledger)
            return len(snapshot.devices)
        finally:
            await ledger.close()

    assert asyncio.run(check()) >= 0
