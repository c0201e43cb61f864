"""Gateway configuration: defaults, the contract's example, refusals that name the key."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from gateway.config import DEFAULT_LADDER, ThrottleStep, load_settings, parse_settings
from gateway.errors import ConfigError

EXAMPLE = """
topic_prefix = "tokens/v1"

[meters]
api_calls = "0.01"
gpu_seconds = "1/3"

[[throttle]]
below = "20%"
rate = "50%"

[[throttle]]
below = "5%"
rate = "20%"
"""


def test_defaults_price_nothing_and_use_the_two_step_ladder() -> None:
    settings = parse_settings({})
    assert settings.topic_prefix == "tokens/v1"
    assert dict(settings.meters) == {}
    assert settings.throttle == DEFAULT_LADDER
    assert settings.throttle == (
        ThrottleStep(Fraction(1, 5), 500),
        ThrottleStep(Fraction(1, 20), 200),
    )


def test_the_contract_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE)
    settings = load_settings(path, environ={})
    assert dict(settings.meters) == {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3)}
    assert settings.throttle == DEFAULT_LADDER


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"colour": "blue"}, "'colour'"),
        ({"topic_prefix": "tokens/#"}, "topic_prefix"),
        ({"topic_prefix": ""}, "topic_prefix"),
        ({"meters": {"api_calls": 0.01}}, "meters.api_calls"),
        ({"meters": {"api_calls": "cheap"}}, "meters.api_calls"),
        ({"meters": {"API": "1"}}, "meters.API"),
        ({"meters": "api_calls"}, "[meters]"),
        ({"throttle": [{"below": "20%"}]}, "throttle[0]"),
        ({"throttle": [{"below": "20", "rate": "50%"}]}, "throttle[0]"),
        ({"throttle": [{"below": "20%", "rate": "100%"}]}, "throttle[0]"),
        ({"throttle": [{"below": "20%", "rate": "0%"}]}, "throttle[0]"),
        ({"throttle": {"below": "20%"}}, "throttle"),
        ({"api": "8080"}, "api"),
        ({"broker": 1883}, "broker"),
        ({"device_clock_max_age_s": -1}, "device_clock_max_age_s"),
    ],
)
def test_a_bad_key_or_value_stops_start_up_naming_it(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(raw)
    assert named in str(refused.value)


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('broker = "mqtt://file:1883"\ndb = "/file.db"\n')
    environ = {"TOKENWELL_BROKER": "mqtt://env:1883", "TOKENWELL_DB": "/env.db"}
    settings = load_settings(path, environ=environ)
    assert (settings.broker, settings.db) == ("mqtt://env:1883", Path("/env.db"))
    flagged = settings.with_overrides(broker="mqtt://flag:1883", db=None)
    assert (flagged.broker, flagged.db) == ("mqtt://flag:1883", Path("/env.db"))


def test_an_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("meters = [")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(broken, environ={})
