"""Gateway configuration (contract §9): defaults, the contract's example, refusals that name
the key, and precedence (flags over environment over file over defaults)."""

from __future__ import annotations

import dataclasses
import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    DEFAULT_LADDER,
    Settings,
    ThrottleStep,
    default_db_path,
    load_settings,
    parse_settings,
)
from gateway.errors import ConfigError

EXAMPLE = """
topic_prefix = "tokens/v1"

[meters]              # price in tokens per unit: a decimal or a fraction, as a string
api_calls = "0.01"
gpu_seconds = "1/3"

[[throttle]]          # when the balance falls to or below this share of the allocation,
below = "20%"         # the device is told to run at this share of its nominal rate
rate = "50%"

[[throttle]]
below = "5%"
rate = "20%"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the contract's example ----------------------------------------------------


def test_defaults_price_nothing_and_use_the_two_step_ladder() -> None:
    settings = parse_settings({})
    assert settings.topic_prefix == "tokens/v1"
    assert dict(settings.meters) == {}
    assert (
        settings.throttle
        == DEFAULT_LADDER
        == (
            ThrottleStep(Fraction(1, 5), 500),  # at or below 20%: 50%
            ThrottleStep(Fraction(1, 20), 200),  # at or below 5%: 20%
        )
    )
    assert (settings.broker, settings.api, settings.client_id) == (
        "mqtt://127.0.0.1:1883", "127.0.0.1:8080", "tokenwell-gateway",
    )  # fmt: skip
    assert settings.api_host_port == ("127.0.0.1", 8080)
    assert (settings.device_clock_max_age_s, settings.max_reports_per_second) == (30 * 86400, 20)


def test_no_file_and_no_environment_gives_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(None, environ={"XDG_DATA_HOME": str(tmp_path)})
    assert settings == dataclasses.replace(parse_settings({}), db=settings.db)
    assert settings.db == tmp_path / "tokenwell" / "ledger.sqlite3"


def test_the_contract_example_parses_to_its_prices_and_the_default_ladder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE), environ={})
    assert dict(settings.meters) == {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3)}
    assert settings.throttle == DEFAULT_LADDER
    assert settings.topic_prefix == "tokens/v1"


def test_every_key_can_be_set(tmp_path: Path) -> None:
    text = """
    topic_prefix = "acme/tokens-v1.2"
    broker = "mqtts://user:pass@broker.example:8883"
    db = "/var/lib/tokenwell/ledger.sqlite3"
    api = "[::1]:9090"
    client_id = "gw-2"
    device_clock_max_age_s = 0
    max_reports_per_second = 1
    throttle = []
    [meters]
    api_calls = "0.01"
    """
    settings = load_settings(write(tmp_path, textwrap.dedent(text)), environ={})
    assert settings == Settings(
        topic_prefix="acme/tokens-v1.2",
        meters={"api_calls": Fraction(1, 100)},
        throttle=(),
        broker="mqtts://user:pass@broker.example:8883",
        db=Path("/var/lib/tokenwell/ledger.sqlite3"),
        api="[::1]:9090",
        client_id="gw-2",
        device_clock_max_age_s=0,
        max_reports_per_second=1,
    )
    assert settings.api_host_port == ("::1", 9090)


def test_throttle_steps_are_kept_lowest_threshold_last_whatever_the_file_order() -> None:
    steps = [{"below": "5%", "rate": "20%"}, {"below": "50%", "rate": "90%"},
             {"below": "20%", "rate": "50%"}]  # fmt: skip
    settings = parse_settings({"throttle": steps})
    assert [s.below for s in settings.throttle] == [Fraction(1, 2), Fraction(1, 5), Fraction(1, 20)]
    assert [s.rate_permille for s in settings.throttle] == [900, 500, 200]


def test_settings_are_frozen_and_prices_read_only() -> None:
    settings = parse_settings({"meters": {"api_calls": "1"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.broker = "mqtt://elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.meters["api_calls"] = Fraction(0)  # type: ignore[index]


# --- refusals name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"colour": "blue"}, "'colour'"),
        ({"Topic_prefix": "x"}, "'Topic_prefix'"),
        ({"topic_prefix": "tokens/#"}, "topic_prefix"),
        ({"topic_prefix": "tokens/+/x"}, "topic_prefix"),
        ({"topic_prefix": ""}, "topic_prefix"),
        ({"topic_prefix": "/tokens"}, "topic_prefix"),
        ({"topic_prefix": "tokens/"}, "topic_prefix"),
        ({"topic_prefix": "tokens//v1"}, "topic_prefix"),
        ({"topic_prefix": "tokens v1"}, "topic_prefix"),
        ({"topic_prefix": 1}, "topic_prefix"),
        ({"meters": "api_calls"}, "[meters]"),
        ({"meters": {"api_calls": 0.01}}, "meters.api_calls"),
        ({"meters": {"api_calls": 1}}, "meters.api_calls"),
        ({"meters": {"api_calls": "cheap"}}, "meters.api_calls"),
        ({"meters": {"api_calls": "-1"}}, "meters.api_calls"),
        ({"meters": {"api_calls": "1/0"}}, "meters.api_calls"),
        ({"meters": {"api_calls": "1e-2"}}, "meters.api_calls"),
        ({"meters": {"api_calls": {"price": "1"}}}, "meters.api_calls"),
        ({"meters": {"API": "1"}}, "meters.API"),
        ({"meters": {"a" * 33: "1"}}, "meters.aaa"),
        ({"throttle": {"below": "20%"}}, "throttle"),
        ({"throttle": ["20%"]}, "throttle[0]"),
        ({"throttle": [{"below": "20%"}]}, "throttle[0].rate"),
        ({"throttle": [{"rate": "50%"}]}, "throttle[0].below"),
        ({"throttle": [{"below": "20%", "rate": "50%", "colour": "red"}]}, "'colour'"),
        ({"throttle": [{"below": "20", "rate": "50%"}]}, "throttle[0].below"),
        ({"throttle": [{"below": "150%", "rate": "50%"}]}, "throttle[0].below"),
        ({"throttle": [{"below": 0.2, "rate": "50%"}]}, "throttle[0].below"),
        ({"throttle": [{"below": "20%", "rate": "100%"}]}, "throttle[0].rate"),
        ({"throttle": [{"below": "20%", "rate": "0%"}]}, "throttle[0].rate"),
        ({"throttle": [{"below": "20%", "rate": "0.05%"}]}, "throttle[0].rate"),
        ({"throttle": [{"below": "20%", "rate": "50%"}, {"below": "5%", "rate": "x"}]},
         "throttle[1].rate"),
        ({"api": "8080"}, "api"),
        ({"api": ":8080"}, "api"),
        ({"api": "localhost:99999"}, "api"),
        ({"api": "localhost:http"}, "api"),
        ({"api": "localhost:\u0668\u0660"}, "api"),  # Arabic-Indic "80": isdigit() says yes
        ({"api": 8080}, "api"),
        ({"broker": 1883}, "broker"),
        ({"broker": ""}, "broker"),
        ({"client_id": ""}, "client_id"),
        ({"db": ""}, "db"),
        ({"db": 5}, "db"),
        ({"device_clock_max_age_s": -1}, "device_clock_max_age_s"),
        ({"device_clock_max_age_s": "30"}, "device_clock_max_age_s"),
        ({"device_clock_max_age_s": True}, "device_clock_max_age_s"),
        ({"max_reports_per_second": 0}, "max_reports_per_second"),
        ({"max_reports_per_second": 2.5}, "max_reports_per_second"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_stops_start_up_naming_it(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(raw)
    assert named in str(refused.value)


def test_a_refusal_names_the_file_too(tmp_path: Path) -> None:
    path = write(tmp_path, 'colour = "blue"\n')
    with pytest.raises(ConfigError, match=r"gateway\.toml: unknown key 'colour'"):
        load_settings(path, environ={})


def test_an_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("meters = [")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(broken, environ={})


# --- precedence -------------------------------------------------------------------------------


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = write(tmp_path, 'broker = "mqtt://file:1883"\ndb = "/file.db"\n')
    environ = {"TOKENWELL_BROKER": "mqtt://env:1883", "TOKENWELL_DB": "/env.db"}
    settings = load_settings(path, environ=environ)
    assert (settings.broker, settings.db) == ("mqtt://env:1883", Path("/env.db"))
    flagged = settings.with_overrides(broker="mqtt://flag:1883", db=None)
    assert (flagged.broker, flagged.db) == ("mqtt://flag:1883", Path("/env.db"))


def test_the_file_applies_where_the_environment_is_silent_or_empty(tmp_path: Path) -> None:
    path = write(tmp_path, 'broker = "mqtt://file:1883"\ndb = "/file.db"\n')
    for environ in ({}, {"TOKENWELL_BROKER": "", "TOKENWELL_DB": ""}):
        settings = load_settings(path, environ=environ)
        assert (settings.broker, settings.db) == ("mqtt://file:1883", Path("/file.db"))


def test_tokenwell_config_names_the_file_unless_one_is_given(tmp_path: Path) -> None:
    named = write(tmp_path, 'client_id = "from-env-file"\n')
    given = tmp_path / "given.toml"
    given.write_text('client_id = "from-given-file"\n')
    environ = {"TOKENWELL_CONFIG": str(named)}
    assert load_settings(None, environ=environ).client_id == "from-env-file"
    assert load_settings(given, environ=environ).client_id == "from-given-file"


def test_the_default_ledger_location_comes_from_the_environment_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not from the process environment behind the caller's back."""
    monkeypatch.setenv("TOKENWELL_DB", "/process/env.db")
    settings = load_settings(None, environ={"XDG_DATA_HOME": str(tmp_path)})
    assert settings.db == tmp_path / "tokenwell" / "ledger.sqlite3"
    assert load_settings(None, environ={"TOKENWELL_DB": "/given.db"}).db == Path("/given.db")
    assert default_db_path() == Path("/process/env.db")  # no environ: the process's own
    assert default_db_path({"TOKENWELL_DB": "/x.db", "XDG_DATA_HOME": "/d"}) == Path("/x.db")
