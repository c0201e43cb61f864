"""``tokenwell sim``: run simulated devices against a broker (contract §8).

The composition root of the simulator: it resolves arguments and environment once, fetches
the gateway key and provisions devices through the admin API if asked, then runs a
:class:`~device_sim.fleet.Fleet` on the real clock until ``--duration`` ends or
SIGINT/SIGTERM, printing a one-line summary every ``--summary-every`` seconds.

A wrong argument, an unreachable broker or API, or an unreadable state file gives one
clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_sim.device import SimDevice, make_devices
from device_sim.faults import FaultKind, FaultPlan
from device_sim.fleet import DEFAULT_PREFIX, Fleet
from device_sim.store import load_fleet, merge_fleet
from gateway.client import AdminClient, ApiRefused, find_token
from gateway.errors import TokenwellError, first_leaf
from gateway.mqtt import BrokerUrl
from gateway.wire import public_key_from_hex, public_key_hex

DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
MAX_DEVICES: Final = 100_000
EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130
HTTP_CONFLICT: Final = 409


def _ranged(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not within [{low:g}, {high:g}]")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenwell sim`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tokenwell sim", description="Run simulated devices against an MQTT broker."
    )
    add = parser.add_argument
    add("--devices", type=_ranged(int, 1, MAX_DEVICES), required=True, help="how many devices")
    add("--broker", help="broker URL (default $TOKENWELL_BROKER or mqtt://127.0.0.1:1883)")
    add("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    add("--interval", type=_ranged(float, 1e-3, 86400), default=1.0, help="seconds between reports")
    add("--duration", type=_ranged(float, 0, 1e9), help="stop after this many seconds")
    add("--seed", type=int, default=0, help="derives device keys, rates and faults (default 0)")
    add("--id-prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    add("--step", type=_ranged(int, 0, 2**62), default=0, help="report sooner on crossing a step")
    add("--state", type=Path, help="JSON file keeping device state across runs")
    for kind in FaultKind:
        add(f"--{kind}", type=_ranged(float, 0, 1), default=0.0, metavar="P",
            help=f"probability of a {kind} fault per report")  # fmt: skip
    add("--gateway-key", help="the gateway's Ed25519 public key (hex), to verify control messages")
    add("--api", default=os.environ.get("TOKENWELL_API"), help="admin API URL ($TOKENWELL_API)")
    add("--token", help="admin API bearer token (default $TOKENWELL_TOKEN)")
    add("--provision", action="store_true", help="provision every device through the admin API")
    add("--tokens", type=_ranged(int, 0, 2**62), default=1000, help="allocation when provisioning")
    add("--account", help="when provisioning: the devices' account (default: each its own)")
    add("--shared", action="store_true",
        help="when provisioning: draw from the account's shared pool (not --tokens)")  # fmt: skip
    add("--summary-every", type=_ranged(float, 0.1, 86400), default=5.0, help="seconds")
    add("--connect-timeout", type=_ranged(float, 0.1, 3600), default=10.0, help="seconds")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the simulator with ``argv`` (without ``sim``); returns the exit status."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exit_:  # --help, or a bad argument (argparse printed why)
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        broker = BrokerUrl.parse(
            args.broker or os.environ.get("TOKENWELL_BROKER") or DEFAULT_BROKER
        )
        devices = _devices(args)
        gateway_key = _gateway_key(args)
        if args.provision:
            _provision(args, devices)
        asyncio.run(_simulate(args, broker, devices, gateway_key))
    except TokenwellError as exc:
        return _fail(exc)
    except BaseExceptionGroup as group:  # out of the TaskGroup
        return _fail(first_leaf(group))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def _fail(error: BaseException) -> int:
    print(f"tokenwell sim: {error}", file=sys.stderr)
    return EXIT_ERROR


def _devices(args: argparse.Namespace) -> list[SimDevice]:
    """The fresh devices, with those saved in ``--state`` continuing where they stopped."""
    try:
        fresh = make_devices(args.devices, args.seed, step=args.step, id_prefix=args.id_prefix)
    except ValueError as exc:  # an --id-prefix that makes bad device ids
        raise TokenwellError(f"--id-prefix: {exc}") from None
    if args.state is None:
        return fresh
    return merge_fleet(load_fleet(args.state), fresh)


def _gateway_key(args: argparse.Namespace) -> Ed25519PublicKey | None:
    """From ``--gateway-key``, else from the admin API; None (with a warning) without either."""
    if args.gateway_key:
        try:
            return public_key_from_hex(args.gateway_key)
        except ValueError as exc:
            raise TokenwellError(f"--gateway-key: {exc}") from None
    if args.api:
        with AdminClient(args.api, find_token(args.token)) as client:
            text = client.gateway_key()
        try:
            return public_key_from_hex(text)
        except ValueError as exc:
            raise TokenwellError(f"the admin API gave a bad gateway key: {exc}") from None
    print("tokenwell sim: no --gateway-key or --api: control messages will be ignored",
          file=sys.stderr)  # fmt: skip
    return None


def _provision(args: argparse.Namespace, devices: Sequence[SimDevice]) -> None:
    """Provision each device with ``--tokens``; one already provisioned (409) is fine."""
    if not args.api:
        raise TokenwellError("--provision needs --api URL (or $TOKENWELL_API)")
    with AdminClient(args.api, find_token(args.token)) as client:
        for device in devices:
            key = public_key_hex(device.public_key)
            try:
                client.add_device(
                    device.device_id,
                    key,
                    0 if args.shared else args.tokens,
                    args.account,
                    pool="shared" if args.shared else None,
                )
            except ApiRefused as exc:
                if exc.status != HTTP_CONFLICT:
                    raise


def _fault_plan(args: argparse.Namespace) -> FaultPlan:
    return FaultPlan(
        duplicate=args.duplicate,
        replay=args.replay,
        reorder=args.reorder,
        forge=args.forge,
        impersonate=args.impersonate,
        malformed=args.malformed,
        seed=args.seed,
    )


async def _simulate(
    args: argparse.Namespace,
    broker: BrokerUrl,
    devices: Sequence[SimDevice],
    key: Ed25519PublicKey | None,
) -> None:
    faults = _fault_plan(args)
    fleet = Fleet.create(devices, broker, key, args.prefix, faults, args.state)
    await fleet.start(args.connect_timeout)
    print(f"tokenwell sim: {len(devices)} devices on {broker}, prefix {args.prefix}", flush=True)
    try:
        async with asyncio.TaskGroup() as tasks:
            run = tasks.create_task(fleet.run(args.interval, args.duration), name="sim-run")
            _cancel_on_signals(run)
            tasks.create_task(_print_summaries(fleet, run, args.summary_every), name="sim-summary")
    finally:
        await fleet.stop()


def _cancel_on_signals(task: asyncio.Task[None]) -> None:
    """SIGINT and SIGTERM end ``task``; the fleet then stops cleanly and saves its state."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
            loop.add_signal_handler(signum, task.cancel)


async def _print_summaries(fleet: Fleet, run: asyncio.Task[None], every: float) -> None:
    """A summary line every ``every`` seconds while ``run`` lasts, and one when it ends."""
    while not run.done():
        await asyncio.wait([run], timeout=every)
        print(f"tokenwell sim: {fleet.summary().line()}", flush=True)
