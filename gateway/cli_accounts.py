"""The token-economics commands of ``tokenwell``: accounts, pools, grants, statements,
and ``verify`` (offline).

``tokenwell pool set`` changes only the settings it is given: it reads the pool's current
settings and sends them back with the changes (the API's ``PUT`` replaces them whole).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.client import AdminClient, ApiRefused
from gateway.errors import TokenwellError
from gateway.pricing import format_price
from gateway.statement import verify_statement
from gateway.views import rfc3339


def add_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Register ``accounts``, ``pool`` and ``grant`` on the ``commands`` subparsers."""
    accounts = commands.add_parser("accounts", help="accounts and their devices")
    actions = accounts.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=parser_class
    )
    actions.add_parser("list", help="every account")
    actions.add_parser("show", help="an account, its devices and shared pool").add_argument(
        "account"
    )

    pool = commands.add_parser("pool", help="show or configure a pool (an allocation)")
    pool_actions = pool.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=parser_class
    )
    show = pool_actions.add_parser("show", help="a pool: settings, balance, grants, devices")
    _target(show)
    configure = pool_actions.add_parser(
        "set", help="create an account's shared pool or change a pool's settings"
    )
    _target(configure)
    configure.add_argument("--policy", choices=["prepaid", "overage", "payg"])
    configure.add_argument("--overage-cap", type=int, help="overage policy: tokens past zero")
    configure.add_argument("--period", choices=["day", "week", "month", "none"])
    configure.add_argument("--anchor", help="first period start (RFC 3339 or a date, UTC)")
    configure.add_argument("--period-tokens", type=int, help="granted every period")
    configure.add_argument("--rollover-cap", type=int, help="unused tokens carried over")
    configure.add_argument(
        "--threshold", action="append", metavar="SHARE",
        help='alert when this share is used, e.g. 80%% (repeat; "none" clears)',
    )  # fmt: skip
    configure.add_argument("--topup-floor", type=int, help="top up below this balance")
    configure.add_argument("--topup-tokens", type=int, help="tokens of each top-up (0: none)")

    grant = commands.add_parser("grant", help="grant tokens (with an expiry and a priority)")
    _target(grant)
    grant.add_argument("tokens", type=int)
    grant.add_argument("--priority", type=int, default=0, help="lower burns first (default 0)")
    grant.add_argument("--expires", help="expiry (RFC 3339, a date or ms)")
    grant.add_argument("--idempotency-key", help="a retry with the same key credits once")

    statement = commands.add_parser(
        "statement", help="an account's signed, verifiable statement over whole UTC hours"
    )
    statement.add_argument("account")
    statement.add_argument("--since", required=True, help="whole UTC hour (RFC 3339 or date)")
    statement.add_argument("--until", required=True, help="whole UTC hour, exclusive")
    statement.add_argument("-o", "--output", type=Path, help="write it here (default: stdout)")

    verify = commands.add_parser(
        "verify", help="check a statement offline: signatures, evidence, every line and total"
    )
    verify.add_argument("statement", type=Path, help="the statement file ('-': stdin)")
    verify.add_argument("--gateway-key", help="pin the gateway's public key (hex)")
    verify.add_argument(
        "--device-keys", type=Path,
        help='pin the devices\' keys: a JSON file {"device id": "public key hex"}',
    )  # fmt: skip


def _target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--account", help="the account's shared pool")
    group.add_argument("--device", help="the pool the device draws from")


def _pool_path(args: argparse.Namespace) -> str:
    if args.account is not None:
        return f"/v1/accounts/{args.account}/pool"
    return f"/v1/devices/{args.device}/allocation"


def cmd_accounts(args: argparse.Namespace, client: AdminClient) -> int:
    if args.action == "list":
        for account in client.get("/v1/accounts"):
            shared = "shared pool" if account["shared_pool"] else "no shared pool"
            print(f"{account['account']}: {len(account['devices'])} devices, {shared}")
        return 0
    found = [a for a in client.get("/v1/accounts") if a["account"] == args.account]
    if not found:
        raise ApiRefused(404, "not_found", f"no account {args.account!r}")
    print(f"account: {args.account}")
    print(f"devices: {', '.join(found[0]['devices']) or '-'}")
    if found[0]["shared_pool"]:
        print_pool(client.get(f"/v1/accounts/{args.account}/pool"))
    return 0


def cmd_pool(args: argparse.Namespace, client: AdminClient) -> int:
    path = _pool_path(args)
    if args.action == "show":
        print_pool(client.get(path))
        return 0
    try:
        current = settings_of(client.get(path))
    except ApiRefused as exc:
        if exc.status != 404 or args.account is None:
            raise
        current = {"policy": "prepaid"}  # a new shared pool
    print_pool(client.put(path, merged(current, args)))
    return 0


def cmd_grant(args: argparse.Namespace, client: AdminClient) -> int:
    path = (
        f"/v1/accounts/{args.account}/grants"
        if args.account is not None
        else f"/v1/devices/{args.device}/grants"
    )
    body: dict[str, Any] = {"tokens": args.tokens, "priority": args.priority}
    if args.expires:
        body["expires_at"] = args.expires
    result = client.post(path, body, args.idempotency_key)
    if result.get("replayed"):
        print("already applied (same Idempotency-Key): nothing more credited")
    print_pool(result)
    return 0


def cmd_statement(args: argparse.Namespace, client: AdminClient) -> int:
    params = {"since": args.since, "until": args.until}
    body = client.get_bytes(f"/v1/accounts/{args.account}/statement", params)
    if args.output is None:
        sys.stdout.buffer.write(body)
    else:
        try:
            args.output.write_bytes(body)
        except OSError as exc:
            raise TokenwellError(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"statement of {args.account} written to {args.output}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Offline: no gateway needed. Exit 0 and a summary when every check passes."""
    data = sys.stdin.buffer.read() if str(args.statement) == "-" else _read(args.statement)
    pins = None
    if args.device_keys is not None:
        try:
            pins = {d: bytes.fromhex(k) for d, k in json.loads(_read(args.device_keys)).items()}
        except (ValueError, AttributeError, TypeError):
            raise TokenwellError(f'{args.device_keys}: want {{"device": "hex key"}}') from None
    try:
        gateway_key = None if args.gateway_key is None else bytes.fromhex(args.gateway_key)
    except ValueError:
        raise TokenwellError("--gateway-key must be hex") from None
    checked = verify_statement(data, gateway_public_key=gateway_key, device_keys=pins)
    header = ("device", "boot", "meter", "price", "from", "to", "tokens")
    rows = [
        (line.device, str(line.boot), line.meter,
         "-" if line.price is None else format_price(line.price),
         str(line.from_units), str(line.to_units), str(line.tokens))
        for line in checked.lines
    ]  # fmt: skip
    print_rows(header, rows)
    window = f"{rfc3339(checked.since_ms)} to {rfc3339(checked.until_ms)}"
    print(f"verified: account {checked.account}, {window}, {checked.total} tokens"
          f"{'' if pins else ' (device keys not pinned: --device-keys)'}")  # fmt: skip
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TokenwellError(f"cannot read {path}: {exc.strerror}") from None


def print_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def settings_of(view: dict[str, Any]) -> dict[str, Any]:
    """The ``PUT`` body that keeps a pool's current settings."""
    period = view.get("period")
    return {
        "policy": view["policy"],
        "overage_cap": view["overage_cap"],
        "period": None if period is None else {
            "unit": period["unit"], "anchor": period["anchor"], "tokens": period["tokens"],
            "rollover_cap": period["rollover_cap"],
        },
        "thresholds": view["thresholds"],
        "topup": view["topup"],
    }  # fmt: skip


def merged(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``current`` settings with the options given on the command line."""
    body = dict(current)
    if args.policy is not None:
        body["policy"] = args.policy
        if args.policy != "overage":
            body["overage_cap"] = 0
    if args.overage_cap is not None:
        body["overage_cap"] = args.overage_cap
    if args.period == "none":
        body["period"] = None
    elif (
        args.period
        or args.anchor
        or args.period_tokens is not None
        or args.rollover_cap is not None
    ):
        period = dict(body.get("period") or {"rollover_cap": 0, "tokens": 0})
        for key, value in (
            ("unit", args.period),
            ("anchor", args.anchor),
            ("tokens", args.period_tokens),
            ("rollover_cap", args.rollover_cap),
        ):
            if value is not None:
                period[key] = value  # fmt: skip
        if "unit" not in period or "anchor" not in period:
            raise ApiRefused(422, "invalid", "a new period needs --period and --anchor")
        body["period"] = period
    if args.threshold:
        body["thresholds"] = [] if args.threshold == ["none"] else args.threshold
    if args.topup_tokens == 0:
        body["topup"] = None
    elif args.topup_floor is not None or args.topup_tokens is not None:
        topup = dict(body.get("topup") or {})
        topup.update(
            {
                k: v
                for k, v in (("floor", args.topup_floor), ("tokens", args.topup_tokens))
                if v is not None
            }
        )
        if set(topup) != {"floor", "tokens"}:
            raise ApiRefused(422, "invalid", "a new top-up needs --topup-floor and --topup-tokens")
        body["topup"] = topup  # fmt: skip
    return body


def print_pool(view: dict[str, Any]) -> None:
    """A pool, readably."""
    owner = view["device"] or f"account {view['account']}"
    print(f"pool: {view['pool']} ({owner}), policy {view['policy']}", end="")
    print(f", overage cap {view['overage_cap']}" if view["policy"] == "overage" else "")
    period = view.get("period")
    if period:
        print(f"period: every {period['unit']} from {period['anchor']}: {period['tokens']} tokens"
              f", rollover up to {period['rollover_cap']}; now {view['period_start']} to "
              f"{view['period_end']}")  # fmt: skip
    print(f"allocation {view['allocation']}, used {view['used']}, balance {view['balance']}, "
          f"overage {view['overage']}")  # fmt: skip
    for grant in view["grants"]:
        expires = grant["expires_at"] or "no expiry"
        print(f"  grant {grant['seq']} ({grant['kind']}): {grant['remaining']} of "
              f"{grant['tokens']} left, priority {grant['priority']}, {expires}")  # fmt: skip
    if view["thresholds"]:
        fired = ", ".join(view["fired"]) or "none yet"
        print(f"alerts at {', '.join(view['thresholds'])} used (fired this period: {fired})")
    if view["topup"]:
        topup = view["topup"]
        print(f"top-up: {topup['tokens']} tokens below {topup['floor']}")
    if view["devices"]:
        print(f"devices: {', '.join(view['devices'])}")


COMMANDS: dict[str, Callable[[argparse.Namespace, AdminClient], int]] = {
    "accounts": cmd_accounts,
    "pool": cmd_pool,
    "grant": cmd_grant,
    "statement": cmd_statement,
}
OFFLINE: dict[str, Callable[[argparse.Namespace], int]] = {"verify": cmd_verify}
