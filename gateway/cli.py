"""The ``tokenwell`` command line (contract §8).

Every command has ``--help``. A wrong argument, an unreachable broker or API, or a
refused request gives one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gateway import cli_accounts
from gateway.client import AdminClient, ApiRefused, find_token
from gateway.config import DEFAULT_PREFIX, load_settings
from gateway.errors import TokenwellError, first_leaf

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line on stderr (contract §8), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenwell",
        description="Tokenwell: a metering gateway for devices that spend consumption tokens.",
    )
    parser.add_argument(
        "--api", help="admin API URL (default $TOKENWELL_API or http://127.0.0.1:8080)"
    )
    parser.add_argument("--token", help="admin API bearer token (default $TOKENWELL_TOKEN or the "
                        "token file beside the ledger)")  # fmt: skip
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    demo = commands.add_parser("demo", help="broker, gateway, a simulated fleet and a live view")
    demo.add_argument("--devices", type=int, default=6, help="simulated devices (default 6)")
    demo.add_argument("--dir", type=Path, help="where to keep the ledger (default: a temp folder)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--no-auto-refill", action="store_true", help="leave blocked devices blocked")

    gateway = commands.add_parser("gateway", help="run the gateway until SIGINT/SIGTERM")
    gateway.add_argument(
        "--broker", help="broker URL (default $TOKENWELL_BROKER or mqtt://127.0.0.1:1883)"
    )
    gateway.add_argument("--db", type=Path, help="ledger file (default $TOKENWELL_DB)")
    gateway.add_argument("--api", dest="listen", metavar="HOST:PORT", help="admin API address")
    gateway.add_argument(
        "--config", type=Path, help="TOML configuration (default $TOKENWELL_CONFIG)"
    )
    gateway.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    devices = commands.add_parser("devices", help="provisioning").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = devices.add_parser("add", help="provision a device")
    add.add_argument("id")
    add.add_argument("--public-key", required=True, help="Ed25519 public key, 64 hex digits")
    add.add_argument("--tokens", type=int, required=True, help="initial allocation")
    add.add_argument("--account", help="owning account (default: the device id)")
    add.add_argument("--shared", action="store_true", help="draw from the account's shared pool"
                     " (create it with: tokenwell pool set --account ACCOUNT)")  # fmt: skip
    add.add_argument("--cap", type=int, help="with --shared: tokens per period, at most")
    add.add_argument("--policy", choices=["prepaid", "overage", "payg"],
                     help="of its own allocation (default prepaid)")  # fmt: skip
    add.add_argument("--overage-cap", type=int, help="with --policy overage: tokens past zero")
    devices.add_parser("list", help="list devices")
    devices.add_parser("show", help="show one device").add_argument("id")
    devices.add_parser("revoke", help="revoke a device").add_argument("id")

    refill = commands.add_parser("refill", help="add tokens to a device")
    refill.add_argument("id")
    refill.add_argument("tokens", type=int)
    refill.add_argument("--idempotency-key", help="a retry with the same key credits once")

    cli_accounts.add_commands(commands, _Parser)

    usage = commands.add_parser("usage", help="who used what, over what time frame")
    usage.add_argument("--device", metavar="ID", help="only this device")
    usage.add_argument("--account", metavar="ID", help="only this account's devices")
    usage.add_argument("--meter", metavar="NAME", help="only this meter")
    usage.add_argument("--since", help="RFC 3339 time, a date, or ms since the epoch")
    usage.add_argument("--until", help="exclusive end; RFC 3339 time, a date, or ms")
    usage.add_argument("--bucket", choices=["hour", "day", "month", "all"], default="all",
                       help="one row per meter and device per UTC hour, day, month, or "
                       "over the whole span (default all)")  # fmt: skip
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table",
                       help="a table (default), or exactly the API's CSV or JSON")  # fmt: skip
    usage.add_argument("--json", dest="format", action="store_const", const="json",
                       help="same as --format json")  # fmt: skip

    commands.add_parser("gateway-key", help="print the gateway's public key (hex)")

    sim = commands.add_parser("sim", help="run simulated devices against a broker", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)

    watch = commands.add_parser("watch", help="live fleet view from the operator topics")
    watch.add_argument(
        "--broker", help="broker URL (default $TOKENWELL_BROKER or mqtt://127.0.0.1:1883)"
    )
    watch.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    watch.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws")
    watch.add_argument("--duration", type=float, help="stop after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["sim"]:  # the simulator owns its own arguments and --help
        from device_sim.cli import main as sim_main

        return sim_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        if args.command in cli_accounts.OFFLINE:
            return cli_accounts.OFFLINE[args.command](args)
        if args.command in cli_accounts.COMMANDS:
            with _client(args) as client:
                return cli_accounts.COMMANDS[args.command](args, client)
        command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
        return command(args)
    except ApiRefused as exc:
        print(f"tokenwell: {exc.detail} ({exc.code})", file=sys.stderr)
    except TokenwellError as exc:
        print(f"tokenwell: {exc}", file=sys.stderr)
    except BaseExceptionGroup as group:  # raised out of a TaskGroup
        print(f"tokenwell: {first_leaf(group)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.api, find_token(args.token))


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import serve

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_settings(args.config).with_overrides(
        broker=args.broker, db=args.db, api=args.listen
    )
    settings.api_host_port  # noqa: B018 -- validates --api before anything starts
    asyncio.run(serve(settings))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "add":
            _print_device(client.add_device(
                args.id, args.public_key, args.tokens, args.account,
                pool="shared" if args.shared else None, cap=args.cap,
                allocation=_allocation(args),
            ))  # fmt: skip
        elif args.action == "list":
            _print_table(client.devices())
        elif args.action == "show":
            _print_device(client.device(args.id))
        else:
            _print_device(client.revoke(args.id))
    return 0


def _allocation(args: argparse.Namespace) -> dict[str, Any] | None:
    """The dedicated allocation's settings given to ``devices add``, if any."""
    if args.policy is None and args.overage_cap is None:
        return None
    return {"policy": args.policy or "prepaid", "overage_cap": args.overage_cap or 0}


def cmd_refill(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.refill(args.id, args.tokens, args.idempotency_key)
    if result.get("replayed"):
        print("already applied (same Idempotency-Key): nothing more credited")
    _print_device(result)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """The usage table, or the API's CSV or JSON byte for byte (so it can be redirected)."""
    filters = {
        "device": args.device, "account": args.account, "meter": args.meter,
        "since": args.since, "until": args.until, "bucket": args.bucket,
    }  # fmt: skip
    with _client(args) as client:
        if args.format != "table":
            params = {k: v for k, v in filters.items() if v is not None}
            body = client.get_bytes("/v1/usage", {**params, "format": args.format})
            sys.stdout.buffer.write(body)
            sys.stdout.flush()
            return 0
        result = client.usage(**filters)
    header = ("bucket", "device", "account", "meter", "units", "tokens", "overage")
    rows = [tuple(str(r[k] if r[k] is not None else "all") for k in header) for r in result["rows"]]
    _print_rows(header, rows)
    print(f"total tokens: {result['total_tokens']} (overage {result['total_overage']})")
    return 0


def cmd_gateway_key(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.gateway_key())
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from gateway.config import DEFAULT_BROKER
    from gateway.watch import watch

    broker = args.broker or os.environ.get("TOKENWELL_BROKER") or DEFAULT_BROKER
    asyncio.run(watch(broker, args.prefix, refresh=args.refresh, duration=args.duration))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    if args.devices < 1 or args.devices > 1000:
        raise TokenwellError("--devices must be between 1 and 1000")
    asyncio.run(run_demo(args.devices, args.dir, args.duration, not args.no_auto_refill))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "gateway": cmd_gateway,
    "devices": cmd_devices,
    "refill": cmd_refill,
    "usage": cmd_usage,
    "gateway-key": cmd_gateway_key,
    "watch": cmd_watch,
    "demo": cmd_demo,
}

_DEVICE_FIELDS = ("device", "account", "state", "rate_permille", "balance", "allocation", "used")
_MORE_FIELDS = ("pool", "policy", "cap", "overage", "period_end", "public_key", "last_report_at")


def _print_device(device: dict[str, Any]) -> None:
    for key in (*_DEVICE_FIELDS, *_MORE_FIELDS, "updated_at"):
        print(f"{key:>15}: {device.get(key)}")


def _print_table(devices: list[dict[str, Any]]) -> None:
    _print_rows(_DEVICE_FIELDS, [tuple(str(d.get(k)) for k in _DEVICE_FIELDS) for d in devices])


_print_rows = cli_accounts.print_rows


if __name__ == "__main__":
    sys.exit(main())
