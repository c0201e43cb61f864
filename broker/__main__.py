"""`python -m broker [--port N] [--data-dir DIR]`: run a broker, print its URL, stop on Ctrl-C.

Exit status 0 after Ctrl-C or SIGTERM (the broker is stopped cleanly, saving its state),
1 if it cannot start or dies by itself.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from broker.launcher import BrokerStartError, start_broker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    parser.add_argument("--port", type=int, help="TCP port (default: a free one)")
    parser.add_argument("--data-dir", type=Path, help="persistence dir (default: a temp dir)")
    args = parser.parse_args(argv)
    # SIGTERM takes the Ctrl-C path, so `kill` also stops the broker cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        broker = start_broker(args.data_dir, args.port)
    except BrokerStartError as exc:
        print(f"python -m broker: {exc}", file=sys.stderr)
        return 1
    with broker:
        print(broker.url, flush=True)
        try:
            status = broker.wait()
        except KeyboardInterrupt:
            return 0
        tail = broker.log_tail()
        print(f"python -m broker: mosquitto exited ({status})\n{tail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
