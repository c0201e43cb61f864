"""Shared pytest fixtures and options for Tokenwell's tests.

- `broker`: a fresh Mosquitto for one test, its own port and data dir under `tmp_path`,
  stopped afterwards; for tests that restart, kill or fill the broker.
- `shared_broker`: one Mosquitto for the whole session; tests using it must not restart it
  and must use a unique topic prefix and client ids.
- `--soak`: run the long tests marked `@pytest.mark.soak` (skipped otherwise); `soak`
  fixture: whether it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import RunningBroker, start_broker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the long fault-injection tests marked soak",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leftover_gateways() -> Iterator[None]:
    """A test that fails half-way must not leave a gateway process running (those of
    wider-scoped fixtures, started before the test, are left to their fixtures)."""
    from tests.helpers import STARTED, kill_leftovers

    before = len(STARTED)
    yield
    kill_leftovers(before)


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """Whether --soak was given."""
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker of this test's own, persisting under tmp_path/broker; stopped afterwards."""
    with start_broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One broker for the session: use a unique topic prefix, never restart it."""
    with start_broker(tmp_path_factory.mktemp("shared_broker")) as running:
        yield running
