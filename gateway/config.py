"""Gateway configuration (contract §9): a TOML file resolved once into a frozen object.

Precedence, highest first: command-line flags, environment (``TOKENWELL_BROKER``,
``TOKENWELL_DB``, ``TOKENWELL_CONFIG``), the TOML file, defaults. Every key has a
default; an unknown key or a bad value raises :class:`ConfigError` naming the key, so
the gateway stops at start-up instead of running half-configured.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from gateway.errors import ConfigError
from gateway.pricing import parse_price, parse_share
from gateway.wire import is_meter_name

DEFAULT_PREFIX: Final = "tokens/v1"
DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
DEFAULT_API: Final = "127.0.0.1:8080"
DEFAULT_CLIENT_ID: Final = "tokenwell-gateway"
_PREFIX: Final = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*\Z")


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$TOKENWELL_DB``, else ``$XDG_DATA_HOME/tokenwell/ledger.sqlite3``, read from
    ``environ`` (the process environment when None)."""
    environ = os.environ if environ is None else environ
    if env := environ.get("TOKENWELL_DB"):
        return Path(env)
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "tokenwell" / "ledger.sqlite3"


@dataclass(frozen=True, slots=True)
class ThrottleStep:
    """At or below ``below`` (a share of the allocation) the device runs at ``rate_permille``."""

    below: Fraction
    rate_permille: int


DEFAULT_LADDER: Final = (ThrottleStep(Fraction(1, 5), 500), ThrottleStep(Fraction(1, 20), 200))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to start, validated."""

    topic_prefix: str = DEFAULT_PREFIX
    meters: Mapping[str, Fraction] = field(default_factory=lambda: MappingProxyType({}))
    throttle: tuple[ThrottleStep, ...] = DEFAULT_LADDER
    broker: str = DEFAULT_BROKER
    db: Path = field(default_factory=default_db_path)
    api: str = DEFAULT_API
    client_id: str = DEFAULT_CLIENT_ID
    device_clock_max_age_s: int = 30 * 86400
    max_reports_per_second: int = 20  # per device; more is reported as a flood

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the non-None overrides applied (command-line flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def api_host_port(self) -> tuple[str, int]:
        """``api`` split into host and port; validated at load time."""
        return _host_port(self.api)


def load_settings(path: Path | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Resolve the settings from ``path`` (or ``$TOKENWELL_CONFIG``), env and defaults.

    Raises :class:`ConfigError` naming the file and key on any problem.
    """
    path = path or (Path(environ["TOKENWELL_CONFIG"]) if environ.get("TOKENWELL_CONFIG") else None)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from None
    settings = parse_settings(raw, source=str(path or "defaults"))
    # The default location comes from ``environ`` too, never from the real environment
    # behind the caller's back.
    env_db = environ.get("TOKENWELL_DB")
    db = Path(env_db) if env_db else (None if "db" in raw else default_db_path(environ))
    return settings.with_overrides(broker=environ.get("TOKENWELL_BROKER") or None, db=db)


_KEYS: Final = {
    "topic_prefix", "meters", "throttle", "broker", "db", "api", "client_id",
    "device_clock_max_age_s", "max_reports_per_second",
}  # fmt: skip


def parse_settings(raw: Mapping[str, Any], source: str = "config") -> Settings:
    """Validate a parsed TOML document into :class:`Settings`."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}")
    values: dict[str, Any] = {}
    if "topic_prefix" in raw:
        values["topic_prefix"] = _topic_prefix(raw["topic_prefix"], source)
    if "meters" in raw:
        values["meters"] = _meters(raw["meters"], source)
    if "throttle" in raw:
        values["throttle"] = _ladder(raw["throttle"], source)
    for key in ("broker", "api", "client_id"):
        if key in raw:
            values[key] = _string(raw[key], key, source)
    if "api" in values:
        _host_port(values["api"], f"{source}: api")
    if "db" in raw:
        values["db"] = Path(_string(raw["db"], "db", source))
    for key, low in (("device_clock_max_age_s", 0), ("max_reports_per_second", 1)):
        if key in raw:
            value = raw[key]
            if type(value) is not int or value < low:
                raise ConfigError(f"{source}: {key} must be a whole number >= {low}")
            values[key] = value
    return Settings(**values)


def _string(value: object, key: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty string")
    return value


def _topic_prefix(value: object, source: str) -> str:
    if not isinstance(value, str) or not _PREFIX.match(value):
        raise ConfigError(
            f"{source}: topic_prefix {value!r} must be levels of A-Za-z0-9_.- joined by '/'"
        )
    return value


def _meters(table: object, source: str) -> Mapping[str, Fraction]:
    if not isinstance(table, dict):
        raise ConfigError(f'{source}: [meters] must be a table of name = "price"')
    prices: dict[str, Fraction] = {}
    for name, text in table.items():
        if not is_meter_name(name):
            raise ConfigError(f"{source}: meters.{name}: a meter name is 1-32 of a-z 0-9 _")
        try:
            prices[name] = parse_price(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: meters.{name}: {exc}") from None
    return MappingProxyType(prices)


def _ladder(steps: object, source: str) -> tuple[ThrottleStep, ...]:
    if not isinstance(steps, list):
        raise ConfigError(f"{source}: throttle must be an array of tables [[throttle]]")
    ladder = []
    for index, step in enumerate(steps):
        where = f"{source}: throttle[{index}]"
        if not isinstance(step, dict):
            raise ConfigError(f"{where}: must be a table with the keys 'below' and 'rate'")
        if unknown := sorted(set(step) - {"below", "rate"}):
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        if missing := sorted({"below", "rate"} - set(step)):
            raise ConfigError(f"{where}.{missing[0]}: missing; a step needs 'below' and 'rate'")
        below, rate = (_share(step, key, where) for key in ("below", "rate"))
        permille = int(rate * 1000)
        if not 0 < permille < 1000:
            raise ConfigError(f"{where}.rate: must be at least 0.1% and below 100%")
        ladder.append(ThrottleStep(below, permille))
    return tuple(sorted(ladder, key=lambda s: s.below, reverse=True))


def _share(step: Mapping[str, object], key: str, where: str) -> Fraction:
    try:
        return parse_share(step[key])  # type: ignore[arg-type]  # parse_share checks
    except ValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None


def _host_port(text: str, where: str = "api") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
