"""Start a Mosquitto broker with Tokenwell's configuration, for tests, the demo and development.

`start_broker()` writes `DATA_DIR/mosquitto.conf` (a copy of `broker/mosquitto.conf` plus a
listener and `persistence_location DATA_DIR/`) and runs it:

- in an `eclipse-mosquitto:2` container (testcontainers) when a Docker engine answers a ping,
  with `DATA_DIR` mounted as `/mosquitto/data` and the chosen host port mapped to 1883;
- otherwise as a local `mosquitto` subprocess (from `PATH`, else `/usr/sbin/mosquitto`)
  listening on `127.0.0.1:PORT`, logging to `DATA_DIR/mosquitto.log`.

Either way the broker keeps its port and data dir for life, so `stop()` then `start()` (or
`restart()`) brings back its persistent sessions, queued messages and retained messages.
`kill()` is a crash: whatever changed since the last autosave (60 s) is lost.

Errors: `BrokerStartError` (no mosquitto binary, or the broker did not accept an MQTT
connection in time; the message ends with the tail of the broker's log).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

BASE_CONFIG = Path(__file__).with_name("mosquitto.conf")
IMAGE = "eclipse-mosquitto:2"
START_TIMEOUT = 10.0  # seconds for a started broker to accept an MQTT connection
STOP_TIMEOUT = 10.0  # seconds for a graceful stop (saving persistence) before SIGKILL

# MQTT 3.1.1 CONNECT: clean session, keepalive 60 s, empty client id; and DISCONNECT.
# A CONNACK proves mosquitto itself is serving, not merely a port (Docker's proxy accepts
# TCP connections before the container's process listens).
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
_PROBE_CONNACK = b"\x20\x02\x00\x00"
_PROBE_DISCONNECT = b"\xe0\x00"


class BrokerStartError(RuntimeError):
    """The broker could not be started; the message says why and ends with its log tail."""


class _Backend(Protocol):
    """One way of running mosquitto; `RunningBroker` drives it."""

    host: str

    def launch(self) -> None: ...
    def terminate(self, timeout: float) -> None: ...
    def kill(self) -> None: ...
    def is_alive(self) -> bool: ...
    def wait(self) -> int: ...
    def log_tail(self) -> str: ...


class RunningBroker:
    """A Mosquitto broker on a fixed `host:port` with a fixed persistence dir `data_dir`.

    Built started (by `start_broker`). `stop()`, `kill()` and `start()` are idempotent.
    As a context manager it stops on exit and deletes `data_dir` if the launcher made it.
    """

    def __init__(self, backend: _Backend, port: int, data_dir: Path, owns_data_dir: bool) -> None:
        self._backend = backend
        self.port = port
        self.data_dir = data_dir
        self._owns_data_dir = owns_data_dir
        self._running = False

    @property
    def host(self) -> str:
        """Host name or address that clients connect to."""
        return self._backend.host

    @property
    def url(self) -> str:
        """`mqtt://HOST:PORT`, the form `TOKENWELL_BROKER` and `--broker` take."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker was started and has not stopped or died since."""
        return self._running and self._backend.is_alive()

    def start(self) -> None:
        """Start on the same port and data dir; return once it accepts MQTT connections.

        Raises BrokerStartError if it does not within START_TIMEOUT (it is then killed).
        """
        if self.running:
            return
        self._backend.launch()
        self._running = True
        try:
            _wait_until_serving(self.host, self.port, self._backend)
        except BrokerStartError:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop gracefully (SIGTERM): mosquitto saves sessions, queues and retained messages."""
        if self._running:
            self._running = False
            self._backend.terminate(STOP_TIMEOUT)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), like a crash: changes since the last autosave are lost."""
        if self._running:
            self._running = False
            self._backend.kill()

    def restart(self) -> None:
        """`stop()` then `start()`: a clean restart that keeps every persistent session."""
        self.stop()
        self.start()

    def wait(self) -> int:
        """Block until the broker exits by itself or is stopped; return its exit status."""
        return self._backend.wait()

    def log_tail(self) -> str:
        """The last lines of the broker's log, for error messages."""
        return self._backend.log_tail()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RunningBroker({self.url!r}, data_dir={str(self.data_dir)!r})"


def start_broker(data_dir: Path | None = None, port: int | None = None) -> RunningBroker:
    """Start a broker and return it once it accepts MQTT connections.

    `data_dir` (created if missing) holds the generated config, the persistence database and,
    for a local broker, its log; by default a new temporary dir, deleted on context exit.
    `port` defaults to a free port (never 1883, so a developer's own broker is left alone).
    Raises BrokerStartError.
    """
    owns_data_dir = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="tokenwell-broker-")) if data_dir is None else data_dir
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if port is None else port
    backend: _Backend
    if _docker_available():
        config = _write_config(data_dir, "listener 1883", "/mosquitto/data")
        backend = _Container(config, data_dir, port)
    else:
        config = _write_config(data_dir, f"listener {port} 127.0.0.1", str(data_dir))
        backend = _LocalProcess(_find_mosquitto(), config, data_dir / "mosquitto.log")
    broker = RunningBroker(backend, port, data_dir, owns_data_dir)
    try:
        broker.start()
    except BaseException:
        if owns_data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return broker


def _write_config(data_dir: Path, listener: str, persistence_dir: str) -> Path:
    """Write DATA_DIR/mosquitto.conf: the base config plus what only the launcher knows."""
    lines = [
        BASE_CONFIG.read_text(),
        "# --- Added by broker/launcher.py ---",
        listener,
        f"persistence_location {persistence_dir}/",
    ]
    if os.geteuid() == 0:
        # As root, mosquitto would switch to the `mosquitto` user, which cannot write a
        # data dir that root created (its database save then fails with EACCES).
        lines.append("user root")
    config = data_dir / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago, never MQTT's standard 1883."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != 1883:
            return port


def _find_mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if found is None:
        raise BrokerStartError("no Docker engine and no `mosquitto` binary on PATH or /usr/sbin")
    return found


def _docker_available() -> bool:
    """Whether testcontainers is installed and a Docker engine answers within 2 s."""
    try:
        # Imported here: Docker support is optional (the `test` extra).
        import docker
        import testcontainers.core.container  # noqa: F401

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no library, no socket, no daemon, bad DOCKER_HOST: all mean "no"
        return False


def _wait_until_serving(host: str, port: int, backend: _Backend) -> None:
    """Poll with an MQTT CONNECT until a CONNACK comes back; raise BrokerStartError if not."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not backend.is_alive():
            raise BrokerStartError(f"mosquitto exited at start-up\n{backend.log_tail()}")
        if _probe(host, port):
            return
        time.sleep(0.02)
    raise BrokerStartError(
        f"mosquitto did not accept MQTT on {host}:{port} within {START_TIMEOUT:g} s\n"
        f"{backend.log_tail()}"
    )


def _probe(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25) as sock:
            sock.sendall(_PROBE_CONNECT)
            reply = sock.recv(len(_PROBE_CONNACK))
            sock.sendall(_PROBE_DISCONNECT)
    except OSError:
        return False
    return reply == _PROBE_CONNACK


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _LocalProcess:
    """mosquitto as a child process, appending its output to a log file."""

    host = "127.0.0.1"

    def __init__(self, binary: str, config: Path, log_path: Path) -> None:
        self._command = [binary, "-c", str(config)]
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self._log_path.open("ab") as log:
            # Its own session: a Ctrl-C meant for us must not reach it; we stop it ourselves.
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def terminate(self, timeout: float) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        return 0 if self._process is None else self._process.wait()

    def log_tail(self) -> str:
        try:
            return _tail(self._log_path.read_text(errors="replace"))
        except OSError:
            return ""


class _Container:
    """mosquitto in a fresh eclipse-mosquitto:2 container per start, same port and data dir."""

    def __init__(self, config: Path, data_dir: Path, port: int) -> None:
        self._config = f"/mosquitto/data/{config.name}"
        self._data_dir = data_dir
        self._port = port
        self._container: DockerContainer | None = None
        self._last_logs = ""
        self.host = "127.0.0.1"

    def launch(self) -> None:
        from testcontainers.core.container import DockerContainer

        container = (
            DockerContainer(IMAGE)
            .with_volume_mapping(str(self._data_dir), "/mosquitto/data", mode="rw")
            .with_bind_ports(1883, self._port)
            .with_command(["mosquitto", "-c", self._config])
            # Run as the caller, so the database it writes in data_dir is the caller's.
            .with_kwargs(user=f"{os.getuid()}:{os.getgid()}")
        )
        try:
            container.start()
        except Exception as exc:  # translated once, here: docker's errors are many
            with contextlib.suppress(Exception):
                container.stop()
            raise BrokerStartError(f"could not start {IMAGE}: {exc}") from exc
        self._container = container
        self.host = container.get_container_host_ip()

    def terminate(self, timeout: float) -> None:
        if self._container is not None:
            self._container.get_wrapped_container().stop(timeout=int(timeout))  # SIGTERM
            self._remove()

    def kill(self) -> None:
        if self._container is not None:
            self._container.get_wrapped_container().kill()  # SIGKILL
            self._remove()

    def is_alive(self) -> bool:
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status in ("created", "running")

    def wait(self) -> int:
        if self._container is None:
            return 0
        return int(self._container.get_wrapped_container().wait()["StatusCode"])

    def log_tail(self) -> str:
        if self._container is None:
            return self._last_logs
        stdout, stderr = self._container.get_logs()
        return _tail((stdout + stderr).decode(errors="replace"))

    def _remove(self) -> None:
        assert self._container is not None
        self._last_logs = self.log_tail()
        self._container.stop()  # removes the container; data_dir stays
        self._container = None
