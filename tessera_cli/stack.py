"""The local stack: the service registry and the `tessera up` process supervisor.

`Stack.run()` resolves PostgreSQL and NATS (external via TESSERA_DATABASE_URL / TESSERA_NATS_URL,
else embedded servers under TESSERA_HOME on free ports), migrates the database, starts every service
in `SERVICES` as a child process, waits until each reports SERVING over `grpc.health.v1`, then starts
the REST gateway (`GATEWAY`) and waits until its `/readyz` answers 200, records the addresses and pids
in `TESSERA_HOME/stack.json` (read by `tessera doctor`, `migrate` and `events`), then supervises until
Ctrl-C / SIGTERM or a child's death, and stops everything it started (the gateway first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tessera_cli.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError, port_is_free
from tessera_cli.settings import GATEWAY_PORT_ENV, CliSettings, port_env_var

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

STACK_FILE = "stack.json"
DATABASE_NAME = "tessera"
SERVICE_HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
# Variables of the CLI's own environment that must not reach a service: each service gets its own value.
_NOT_INHERITED = ("TESSERA_METRICS_PORT", "TESSERA_HOME")


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One gRPC service process of the stack."""

    name: str
    module: str
    default_port: int
    grpc_service: str
    publishes_events: bool = True

    @property
    def port_env(self) -> str:
        return port_env_var(self.name)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """The REST gateway process: `up` starts it after every service is SERVING; `doctor` checks it."""

    module: str
    default_port: int
    health_path: str = "/readyz"  # 200 only when every backend service it routes to is SERVING
    name: str = "gateway"

    @property
    def port_env(self) -> str:
        return GATEWAY_PORT_ENV


# Adding a service to the local stack (and to `tessera doctor`) is one line here.
# Identity comes first: every other service fetches its token-verification keys (JWKS) from it.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="identity",
        module="services.identity.main",
        default_port=50052,
        grpc_service="tessera.identity.v1.IdentityService",
    ),
    ServiceSpec(
        name="tenancy",
        module="services.tenancy.main",
        default_port=50051,
        grpc_service="tessera.tenancy.v1.TenancyService",
    ),
    ServiceSpec(
        name="workflow",
        module="services.workflow.main",
        default_port=50053,
        grpc_service="tessera.workflow.v1.WorkflowService",
    ),
)

# The REST/JSON gateway in front of every service (port: TESSERA_GATEWAY_PORT or `--port gateway=N`).
GATEWAY: GatewaySpec | None = GatewaySpec(module="gateway.main", default_port=8080, health_path="/readyz")


def gateway_url(port: int) -> str:
    """Base URL of a gateway listening on the local stack's host."""
    return f"http://{SERVICE_HOST}:{port}"


def service_names() -> list[str]:
    """Names of every registered service."""
    return [spec.name for spec in SERVICES]


class StackError(Exception):
    """`tessera up` (or a command looking for the stack) cannot go on; the message tells the user why."""


# --- stack.json -------------------------------------------------------------------------------------------


ProcessKind = Literal["up", "postgres", "nats", "service", "gateway"]


class ProcessRecord(BaseModel):
    """A process of the stack; create_time guards against a recycled pid."""

    pid: int
    create_time: float
    kind: ProcessKind

    @classmethod
    def of(cls, pid: int, kind: ProcessKind) -> ProcessRecord:
        return cls(pid=pid, create_time=psutil.Process(pid).create_time(), kind=kind)

    def is_alive(self) -> bool:
        """True while this very process (not a later one with the same pid) runs."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class ServiceRecord(BaseModel):
    """A running service: where to reach it and where it logs."""

    name: str
    grpc_service: str
    address: str
    log: str
    process: ProcessRecord


class GatewayRecord(BaseModel):
    """The running REST gateway: its base URL (http://host:port), address and log."""

    url: str
    address: str
    log: str
    process: ProcessRecord


class ServerRecord(BaseModel):
    """PostgreSQL or NATS as the stack uses it."""

    url: str
    embedded: bool
    process: ProcessRecord | None = None
    log: str | None = None


class StackState(BaseModel):
    """Contents of TESSERA_HOME/stack.json."""

    version: Literal[1] = 1
    status: Literal["starting", "ready"]
    home: str
    started_at: str
    up: ProcessRecord
    database: ServerRecord | None = None  # url: the admin (superuser) URL, used by migrate and doctor
    nats: ServerRecord | None = None
    services: list[ServiceRecord] = []
    gateway: GatewayRecord | None = None

    def processes(self) -> list[ProcessRecord]:
        """Every process the stack started (gateway, services, then NATS, then PostgreSQL)."""
        found = [self.gateway.process] if self.gateway is not None else []
        found += [record.process for record in self.services]
        for server in (self.nats, self.database):
            if server is not None and server.process is not None:
                found.append(server.process)
        return found


def stack_file(home: Path) -> Path:
    """Where `tessera up` records the running stack."""
    return home / STACK_FILE


def read_state(home: Path) -> StackState | None:
    """The recorded stack of home, or None; raises StackError if the file is unreadable."""
    path = stack_file(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StackError(f"cannot read {path}: {exc}") from None
    try:
        return StackState.model_validate_json(text)
    except ValidationError as exc:
        raise StackError(
            f"{path} is not a stack file written by this version of tessera ({exc.error_count()} errors); "
            "remove it if no stack is running"
        ) from None


def write_state(home: Path, state: StackState) -> None:
    """Atomically write stack.json, readable only by its owner (it may hold a database password)."""
    path = stack_file(home)
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(state.model_dump_json(indent=2))
    tmp.replace(path)


def live_state(home: Path) -> StackState | None:
    """The stack running from home (None if none); raises StackError naming a stale stack.json."""
    state = read_state(home)
    if state is None:
        return None
    if not state.up.is_alive():
        raise StackError(
            f"{stack_file(home)} is stale: the `tessera up` that wrote it (pid {state.up.pid}) is not running; "
            "start the stack again (`tessera up` cleans up after it) or delete the file"
        )
    return state


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server URL and where it came from (for messages)."""

    url: str
    source: str


def resolve_database_url(settings: CliSettings, *, explicit: str | None = None) -> Endpoint:
    """The admin database URL: --database-url, else TESSERA_DATABASE_URL, else the running local stack."""
    if explicit:
        return Endpoint(explicit, "--database-url")
    if settings.database_url:
        return Endpoint(settings.database_url, "TESSERA_DATABASE_URL")
    state = live_state(settings.home)
    if state is not None and state.database is not None:
        return Endpoint(state.database.url, str(stack_file(settings.home)))
    raise StackError(
        f"no database: set TESSERA_DATABASE_URL, or start the local stack with `tessera up` "
        f"(no stack is running from {settings.home})"
    )


def resolve_nats_url(settings: CliSettings, *, explicit: str | None = None) -> Endpoint:
    """The NATS URL: --nats-url, else TESSERA_NATS_URL, else the running local stack."""
    if explicit:
        return Endpoint(explicit, "--nats-url")
    if settings.nats_url:
        return Endpoint(settings.nats_url, "TESSERA_NATS_URL")
    state = live_state(settings.home)
    if state is not None and state.nats is not None:
        return Endpoint(state.nats.url, str(stack_file(settings.home)))
    raise StackError(
        f"no NATS: set TESSERA_NATS_URL, or start the local stack with `tessera up` "
        f"(no stack is running from {settings.home})"
    )


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- health ---------------------------------------------------------------------------------------------


def health_status(channel: grpc.Channel, service: str, *, timeout: float) -> str:
    """The grpc.health.v1 status of service as a name (SERVING, NOT_SERVING, ...) or the RPC error."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return f"unreachable ({code.name if code else exc})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def http_status(url: str, *, timeout: float) -> tuple[int | None, str]:
    """GET url: (HTTP status, short body or error); status None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  # http://127.0.0.1 URLs only
            return int(response.status), response.read(500).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(500).decode(errors="replace")
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, f"unreachable ({reason})"


# --- processes ------------------------------------------------------------------------------------------


def terminate_processes(records: Sequence[ProcessRecord], *, grace: float) -> list[int]:
    """Stop recorded processes that still run (PostgreSQL with SIGINT, others SIGTERM; SIGKILL after grace)."""
    procs: list[psutil.Process] = []
    for record in records:
        if not record.is_alive():
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(record.pid)
            proc.send_signal(signal.SIGINT if record.kind == "postgres" else signal.SIGTERM)
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [proc.pid for proc in procs]


def _log_tail(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _exit_description(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class _StopRequested(BaseException):
    """SIGINT/SIGTERM arrived while starting or supervising (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@dataclass
class _Child:
    name: str
    spec: ServiceSpec | None  # None: the gateway
    port: int
    log_path: Path
    log_offset: int
    proc: subprocess.Popen[bytes]
    record: ProcessRecord
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{SERVICE_HOST}:{self.port}"

    @property
    def grpc_service(self) -> str:
        return self.spec.grpc_service if self.spec is not None else ""


class Stack:
    """Starts, supervises and stops the local stack; `run()` returns the process exit code."""

    def __init__(
        self,
        settings: CliSettings,
        *,
        console: Console,
        services: Sequence[ServiceSpec] = SERVICES,
        start_services: bool = True,
        follow_logs: bool = False,
    ) -> None:
        self.settings = settings
        self.home = settings.home.expanduser().resolve()
        self.console = console
        self.services = list(services) if start_services else []
        self.follow_logs = follow_logs
        self._pg: EmbeddedPostgres | None = None
        self._nats: EmbeddedNats | None = None
        self._children: list[_Child] = []
        self._gateway: _Child | None = None
        self.gateway = GATEWAY if start_services else None
        self._admin_url = ""
        self._nats_url = ""
        self._service_passwords: dict[str, str] = {}
        self._state: StackState | None = None
        self._followers: list[threading.Thread] = []
        self._stop_followers = threading.Event()
        self._force = False
        self._stopping = False
        self._stop_requested_at = float("-inf")
        self._t0 = time.monotonic()

    # -- entry point --

    def run(self) -> int:
        """Start everything, supervise until a signal or a failure, stop everything; the exit code."""
        previous = {sig: signal.signal(sig, self._raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                self._preflight()
                self._start_database()
                self._start_nats()
                self._migrate()
                self._start_services()
                self._wait_until_serving()
                self._start_gateway()
                self._announce_ready()
                return self._supervise()
            except _StopRequested as stop:
                self.console.print(f"\n[bold]{stop.signal_name} received: stopping the stack[/bold]")
                return 0
            except StackError as exc:
                self.console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
                return 1
            finally:
                self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _raise_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            self._note_force(signum, frame)
            return
        self._stopping = True
        self._stop_requested_at = time.monotonic()
        raise _StopRequested(signum)

    def _note_force(self, signum: int, frame: FrameType | None) -> None:
        # A signal within a second of the first is the same request (e.g. `timeout` signals the process
        # and then its group); a later one means "stop waiting": children still running are killed.
        if time.monotonic() - self._stop_requested_at < 1.0 or self._force:
            return
        self._force = True
        self.console.print(f"[yellow]{signal.Signals(signum).name} again: killing what is left[/yellow]")

    # -- output helpers --

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    @contextlib.contextmanager
    def _step(self, label: str) -> Iterator[None]:
        started = time.monotonic()
        self.console.print(f"[bold blue]→[/bold blue] {escape(label)}…", soft_wrap=True)
        yield
        self.console.print(f"  [green]✓[/green] done ({time.monotonic() - started:.1f}s)")

    # -- start-up --

    def _preflight(self) -> None:
        self.console.print(f"[bold]tessera up[/bold]: state in {escape(self._rel(self.home))}", soft_wrap=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self._clean_previous_run()
        ports: dict[int, list[ServiceSpec | GatewaySpec]] = {}
        for spec in self.services:
            ports.setdefault(self.settings.port_for(spec.name, spec.default_port), []).append(spec)
        if self.gateway is not None:
            ports.setdefault(self.settings.gateway_port, []).append(self.gateway)
        for port, owners in sorted(ports.items()):
            if len(owners) > 1:
                names = " and ".join(owner.name for owner in owners)
                variables = ", ".join(owner.port_env for owner in owners)
                raise StackError(f"port {port} is configured for both {names}; give each its own port ({variables})")
            owner = owners[0]
            if not port_is_free(SERVICE_HOST, port):
                raise StackError(
                    f"port {port} for {owner.name} is already in use; "
                    f"set {owner.port_env} or stop the other process (nothing was started)"
                )
        up = ProcessRecord.of(os.getpid(), "up")
        self._state = StackState(
            status="starting", home=str(self.home), started_at=datetime.now(UTC).isoformat(), up=up
        )

    def _clean_previous_run(self) -> None:
        try:
            previous = read_state(self.home)
        except StackError as exc:
            self.console.print(f"[yellow]![/yellow] {escape(str(exc))}; ignoring it", soft_wrap=True)
            stack_file(self.home).unlink(missing_ok=True)
            return
        if previous is None:
            return
        if previous.up.is_alive():
            raise StackError(
                f"a stack is already running from {self.home} (tessera up pid {previous.up.pid}); "
                f"stop it with Ctrl-C in its terminal (or `kill {previous.up.pid}`), or use another --home"
            )
        leftovers = [record for record in previous.processes() if record.is_alive()]
        if leftovers:
            pids = ", ".join(f"{record.kind} {record.pid}" for record in leftovers)
            self.console.print(f"[yellow]![/yellow] stopping processes left by an earlier `tessera up`: {pids}")
            terminate_processes(leftovers, grace=self.settings.shutdown_grace_seconds + 5)
        self.console.print(f"[yellow]![/yellow] removed stale {escape(self._rel(stack_file(self.home)))}")
        stack_file(self.home).unlink(missing_ok=True)

    def _save(self) -> None:
        if self._state is not None:
            write_state(self.home, self._state)

    def _start_database(self) -> None:
        assert self._state is not None
        if self.settings.database_url:
            url = self.settings.database_url
            with self._step(f"checking PostgreSQL at {redact_url(url)} (TESSERA_DATABASE_URL)"):
                asyncio.run(_check_postgres(url))
            self._admin_url = url
            self._state.database = ServerRecord(url=url, embedded=False)
        else:
            pg_dir = self.home / "postgres"
            self._stop_leftover_postmaster(pg_dir / "pgdata")
            with self._step(f"starting embedded PostgreSQL (data in {self._rel(pg_dir)})"):
                self._pg = EmbeddedPostgres(pg_dir, fsync=not self.settings.embedded_fast)
                try:
                    self._pg.start(timeout=self.settings.startup_timeout_seconds)
                except EmbeddedServerError as exc:
                    raise StackError(str(exc)) from None
                assert self._pg.proc is not None
                asyncio.run(_ensure_database(self._pg.url(), DATABASE_NAME))
            self._admin_url = self._pg.url(DATABASE_NAME)
            self._state.database = ServerRecord(
                url=self._admin_url,
                embedded=True,
                process=ProcessRecord.of(self._pg.proc.pid, "postgres"),
                log=str(self._pg.log_path),
            )
        self._save()

    def _stop_leftover_postmaster(self, pgdata: Path) -> None:
        """A postmaster still running on our data directory (an `up` that was killed) must go first."""
        pid_file = pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
            proc = psutil.Process(pid)
            if "postgres" not in proc.name():
                return
        except (OSError, ValueError, IndexError, psutil.Error):
            return
        self.console.print(f"[yellow]![/yellow] stopping PostgreSQL pid {pid} left running on {self._rel(pgdata)}")
        terminate_processes(
            [ProcessRecord(pid=pid, create_time=proc.create_time(), kind="postgres")],
            grace=self.settings.shutdown_grace_seconds + 20,
        )

    def _start_nats(self) -> None:
        assert self._state is not None
        if self.settings.nats_url:
            url = self.settings.nats_url
            with self._step(f"checking NATS at {redact_url(url)} (TESSERA_NATS_URL)"):
                asyncio.run(_check_nats(url))
            self._nats_url = url
            self._state.nats = ServerRecord(url=url, embedded=False)
        else:
            nats_dir = self.home / "nats"
            with self._step(f"starting embedded NATS with JetStream (data in {self._rel(nats_dir)})"):
                self._nats = EmbeddedNats(nats_dir)
                try:
                    self._nats.start(timeout=self.settings.startup_timeout_seconds)
                except EmbeddedServerError as exc:
                    raise StackError(str(exc)) from None
                assert self._nats.proc is not None
            self._nats_url = self._nats.url
            self._state.nats = ServerRecord(
                url=self._nats_url,
                embedded=True,
                process=ProcessRecord.of(self._nats.proc.pid, "nats"),
                log=str(self._nats.log_path),
            )
        self._save()

    def _migrate(self) -> None:
        from migrations import runner

        if self._pg is None:
            # External servers rarely trust local logins: give each service login role a fresh password
            # for this run (embedded servers use trust authentication and need none).
            self._service_passwords = {spec.name: secrets.token_urlsafe(24) for spec in self.services}
        with self._step("migrating the database (roles, then alembic upgrade head)"):
            try:
                runner.bootstrap(self._admin_url, passwords=self._service_passwords)
                runner.upgrade(self._admin_url, "head")
                revision = runner.current(self._admin_url)
            except Exception as exc:
                raise StackError(f"migrations failed on {redact_url(self._admin_url)}: {exc}") from None
            self.console.print(f"  at revision {escape(revision or '(none)')}")

    def _service_env(self, spec: ServiceSpec, port: int) -> dict[str, str]:
        from migrations import runner

        env = {key: value for key, value in os.environ.items() if key not in _NOT_INHERITED}
        env.update(
            TESSERA_DATABASE_URL=runner.service_url(
                self._admin_url, spec.name, password=self._service_passwords.get(spec.name)
            ),
            TESSERA_NATS_URL=self._nats_url,
            TESSERA_GRPC_HOST=SERVICE_HOST,
            TESSERA_GRPC_PORT=str(port),
            TESSERA_ENVIRONMENT="local",
            TESSERA_LOG_FORMAT=self.settings.log_format,
            TESSERA_LOG_LEVEL=self.settings.log_level,
            TESSERA_SHUTDOWN_GRACE_SECONDS=str(self.settings.shutdown_grace_seconds),
            PYTHONUNBUFFERED="1",
        )
        # Every service learns every other's address (TESSERA_IDENTITY_ADDRESS for the token keys,
        # TESSERA_TENANCY_ADDRESS for identity's membership lookups, ...); settings ignore the rest.
        for other in SERVICES:
            env[f"TESSERA_{other.name.upper()}_ADDRESS"] = (
                f"{SERVICE_HOST}:{self.settings.port_for(other.name, other.default_port)}"
            )
        return env

    def _start_services(self) -> None:
        assert self._state is not None
        if not self.services:
            self.console.print("[dim]--no-services: not starting any service[/dim]")
            return
        for spec in self.services:
            port = self.settings.port_for(spec.name, spec.default_port)
            child = self._spawn(spec.name, spec.module, port, self._service_env(spec, port), spec=spec)
            self._children.append(child)
            self._state.services.append(
                ServiceRecord(
                    name=spec.name,
                    grpc_service=spec.grpc_service,
                    address=child.address,
                    log=str(child.log_path),
                    process=child.record,
                )
            )
        self._save()
        if self.follow_logs:
            for child in self._children:
                self._start_follower(child)

    def _spawn(self, name: str, module: str, port: int, env: dict[str, str], *, spec: ServiceSpec | None) -> _Child:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        self.console.print(
            f"[bold blue]→[/bold blue] starting {name} on {SERVICE_HOST}:{port} (log {self._rel(log_path)})",
            soft_wrap=True,
        )
        with log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- tessera up: starting {name} on port {port} at {stamp} ---\n".encode())
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a terminal's Ctrl-C reaches only `tessera up`, which stops children in order.
                start_new_session=True,
            )
        record = ProcessRecord.of(proc.pid, "service" if spec is not None else "gateway")
        return _Child(name, spec, port, log_path, offset, proc, record)

    def _start_follower(self, child: _Child) -> None:
        thread = threading.Thread(target=self._follow, args=(child,), name=f"follow-{child.name}")
        thread.daemon = True
        thread.start()
        self._followers.append(thread)

    def _gateway_env(self, port: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _NOT_INHERITED}
        env.update(
            TESSERA_GATEWAY_HOST=SERVICE_HOST,
            TESSERA_GATEWAY_PORT=str(port),
            PYTHONUNBUFFERED="1",
        )
        # The local stack serves plain http://127.0.0.1: browsers drop Secure cookies there.
        env.setdefault("TESSERA_GATEWAY_BROWSER__COOKIE_SECURE", "false")
        env.setdefault("TESSERA_GATEWAY_LOG_LEVEL", self.settings.log_level)
        for spec in SERVICES:
            env[f"TESSERA_{spec.name.upper()}_ADDRESS"] = (
                f"{SERVICE_HOST}:{self.settings.port_for(spec.name, spec.default_port)}"
            )
        return env

    def _start_gateway(self) -> None:
        assert self._state is not None
        if self.gateway is None:
            return
        port = self.settings.gateway_port
        child = self._spawn(self.gateway.name, self.gateway.module, port, self._gateway_env(port), spec=None)
        self._gateway = child
        self._state.gateway = GatewayRecord(
            url=gateway_url(port), address=child.address, log=str(child.log_path), process=child.record
        )
        self._save()
        if self.follow_logs:
            self._start_follower(child)
        started = time.monotonic()
        deadline = started + self.settings.startup_timeout_seconds
        url = gateway_url(port) + self.gateway.health_path
        while True:
            self._raise_if_exited(child, during="start-up")
            status, detail = http_status(url, timeout=2.0)
            if status == 200:
                self.console.print(
                    f"  [green]✓[/green] gateway ready at {gateway_url(port)} ({time.monotonic() - started:.1f}s)"
                )
                return
            if time.monotonic() > deadline:
                last = f"HTTP {status} {detail}" if status is not None else detail
                raise StackError(
                    f"the gateway did not answer 200 on {url} within {self.settings.startup_timeout_seconds:g}s "
                    f"(last answer: {last.strip()}); last lines of {child.log_path}:\n"
                    + _log_tail(child.log_path, child.log_offset)
                )
            time.sleep(0.1)

    def _wait_until_serving(self) -> None:
        if not self._children:
            return
        started = time.monotonic()
        deadline = started + self.settings.startup_timeout_seconds
        channels = {child.name: grpc.insecure_channel(child.address) for child in self._children}
        last: dict[str, str] = {}
        try:
            pending = list(self._children)
            while pending:
                for child in list(pending):
                    self._raise_if_exited(child, during="start-up")
                    status = health_status(channels[child.name], child.grpc_service, timeout=1.0)
                    last[child.name] = status
                    if status == "SERVING":
                        self.console.print(
                            f"  [green]✓[/green] {child.name} SERVING at {child.address} "
                            f"({time.monotonic() - started:.1f}s)"
                        )
                        pending.remove(child)
                if pending and time.monotonic() > deadline:
                    child = pending[0]
                    raise StackError(
                        f"{child.name} did not report SERVING within {self.settings.startup_timeout_seconds:g}s "
                        f"(last health status: {last.get(child.name)}); last lines of {child.log_path}:\n"
                        + _log_tail(child.log_path, child.log_offset)
                    )
                if pending:
                    time.sleep(0.1)
        finally:
            for channel in channels.values():
                channel.close()

    def _raise_if_exited(self, child: _Child, *, during: str) -> None:
        code = child.proc.poll()
        if code is not None:
            raise StackError(
                f"{child.name} {_exit_description(code)} during {during}; last lines of {child.log_path}:\n"
                + _log_tail(child.log_path, child.log_offset)
            )

    def _announce_ready(self) -> None:
        assert self._state is not None
        self._state.status = "ready"
        self._save()
        rows: list[tuple[str, str, str, str, str]] = []  # component, address, status, pid, log
        for label, server in (("PostgreSQL", self._state.database), ("NATS", self._state.nats)):
            if server is not None:
                rows.append(
                    (
                        label + (" (embedded)" if server.embedded else " (external)"),
                        redact_url(server.url),
                        "ready",
                        str(server.process.pid) if server.process else "-",
                        self._rel(Path(server.log)) if server.log else "-",
                    )
                )
        for child in self._children:
            rows.append(
                (
                    child.name,
                    f"{child.address} (gRPC {child.grpc_service})",
                    "SERVING",
                    str(child.proc.pid),
                    self._rel(child.log_path),
                )
            )
        if self._gateway is not None:
            base = gateway_url(self._gateway.port)
            rows.append(
                (
                    "gateway",
                    f"{base} (REST/JSON; docs {base}/docs, OpenAPI {base}/openapi.json)",
                    "ready",
                    str(self._gateway.proc.pid),
                    self._rel(self._gateway.log_path),
                )
            )
        # Addresses and logs as plain lines, so they stay copyable at any terminal width.
        width = max(len(row[0]) for row in rows)
        self.console.print("\n[bold]Addresses[/bold]")
        for component, address, *_ in rows:
            self.console.print(f"  {component:<{width}}  {escape(address)}", soft_wrap=True)
        self.console.print("[bold]Logs[/bold]")
        for component, *_, log in rows:
            if log != "-":  # external servers log elsewhere
                self.console.print(f"  {component:<{width}}  {escape(log)}", soft_wrap=True)
        table = Table(title="Readiness", title_justify="left")
        table.add_column("component", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("pid", justify="right", no_wrap=True)
        for component, _, status, pid, _ in rows:
            table.add_row(component, f"[green]{status}[/green]", pid)
        self.console.print(table)
        count = len(self._children)
        gateway = ""
        if self._gateway is not None:
            gateway = (
                f"REST gateway at {gateway_url(self._gateway.port)} (docs: {gateway_url(self._gateway.port)}/docs); "
            )
        self.console.print(
            f"[bold green]✓ Tessera is ready[/bold green] in {time.monotonic() - self._t0:.1f}s: "
            f"{count} service{'s' if count != 1 else ''} SERVING; {escape(gateway)}"
            f"state in {escape(self._rel(stack_file(self.home)))}. Press Ctrl-C to stop.",
            soft_wrap=True,
        )

    # -- supervision --

    def _supervise(self) -> int:
        while True:
            for child in self._running_children():
                code = child.proc.poll()
                if code is not None:
                    self.console.print(
                        f"[red]✗ {child.name} {_exit_description(code)}; last lines of "
                        f"{escape(self._rel(child.log_path))}:[/red]",
                        soft_wrap=True,
                    )
                    self.console.print(
                        _log_tail(child.log_path, child.log_offset), markup=False, highlight=False, soft_wrap=True
                    )
                    self.console.print("[red]stopping the rest of the stack[/red]")
                    return 1
            for label, server in (("PostgreSQL", self._pg), ("NATS", self._nats)):
                if server is not None and server.proc is not None and server.proc.poll() is not None:
                    self.console.print(
                        f"[red]✗ embedded {label} exited with code {server.proc.returncode}; last lines of "
                        f"{escape(self._rel(server.log_path))}:[/red]",
                        soft_wrap=True,
                    )
                    self.console.print(_log_tail(server.log_path, 0), markup=False, highlight=False, soft_wrap=True)
                    return 1
            time.sleep(0.25)

    def _running_children(self) -> list[_Child]:
        """The gateway (if started), then the services."""
        return ([self._gateway] if self._gateway is not None else []) + self._children

    def _follow(self, child: _Child) -> None:
        prefix = f"{child.name} | "
        with child.log_path.open("rb") as log:
            log.seek(child.log_offset)
            pending = b""
            while True:
                chunk = log.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        line = pending.decode(errors="replace").rstrip("\n")
                        self.console.print(prefix + line, markup=False, highlight=False, soft_wrap=True)
                        pending = b""
                    continue
                if self._stop_followers.wait(0.2):
                    if pending:
                        self.console.print(prefix + pending.decode(errors="replace"), markup=False, highlight=False)
                    return

    # -- shutdown --

    def _shutdown(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._stop_requested_at = time.monotonic()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._note_force)
        # The gateway first: it must not keep accepting requests for services that are going away.
        if self._gateway is not None:
            self._stop_children([self._gateway])
        self._stop_children(self._children)
        self._stop_followers.set()
        for thread in self._followers:
            thread.join(timeout=2)
        if self._nats is not None:
            with self._step("stopping embedded NATS"):
                self._nats.stop()
            self._nats = None
        if self._pg is not None:
            with self._step("stopping embedded PostgreSQL"):
                self._pg.stop()
            self._pg = None
        self._kill_stray_descendants()
        if self._state is not None:
            current = read_state_quietly(self.home)
            if current is not None and current.up.pid == os.getpid():
                stack_file(self.home).unlink(missing_ok=True)
            self.console.print("[bold]stack stopped[/bold]")
            self._state = None

    def _stop_children(self, children: Sequence[_Child]) -> None:
        alive = [child for child in children if child.proc.poll() is None]
        if not alive:
            return
        self.console.print(f"[bold blue]→[/bold blue] stopping {', '.join(child.name for child in alive)}…")
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.descendants = psutil.Process(child.proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 5
        killed: list[_Child] = []
        while any(child.proc.poll() is None for child in alive):
            if self._force or time.monotonic() > deadline:
                for child in alive:
                    if child.proc.poll() is None:
                        self.console.print(f"  [yellow]![/yellow] {child.name} did not stop in time: SIGKILL")
                        killed.append(child)
                        child.proc.kill()
                        child.proc.wait(5)
                break
            time.sleep(0.05)
        for child in alive:
            for proc in child.descendants:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            code = child.proc.returncode
            # uvicorn (the gateway) re-raises the SIGTERM it handled once it has shut down cleanly.
            clean = code == 0 or (code == -signal.SIGTERM and child.spec is None and child not in killed)
            mark = "[green]✓[/green]" if clean else "[yellow]![/yellow]"
            how = "shut down on SIGTERM" if clean and code != 0 else _exit_description(code)
            self.console.print(f"  {mark} {child.name} stopped ({how})")

    def _kill_stray_descendants(self) -> None:
        """Last resort: nothing this process started may outlive it."""
        try:
            strays = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        if not strays:
            return
        names = ", ".join(f"{proc.pid}" for proc in strays)
        self.console.print(f"[yellow]![/yellow] killing leftover child processes: {names}")
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(strays, timeout=5)


def read_state_quietly(home: Path) -> StackState | None:
    """stack.json of home, or None if absent or unreadable."""
    try:
        return read_state(home)
    except StackError:
        return None


# --- server checks used by `up` for external servers -----------------------------------------------------


async def _check_postgres(url: str) -> None:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=10)
    except Exception as exc:
        raise StackError(f"cannot connect to PostgreSQL at {redact_url(url)}: {exc}") from None
    await conn.close()


async def _ensure_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def database_url(server_url: str, database: str) -> str:
    """server_url pointing at another database of the same server."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


@contextlib.contextmanager
def scratch_database(server_url: str, *, prefix: str) -> Iterator[str]:
    """A new, uniquely named database on the server of server_url (dropped on exit); yields its URL."""
    name = f"{prefix}_{secrets.token_hex(5)}"

    async def run(statement: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(server_url, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def connect_nats(url: str, *, name: str, timeout: float = 5.0) -> NatsClient:
    """A NATS connection for a short-lived command: fails fast (NatsUnreachable) instead of retrying forever."""
    import nats
    from nats.errors import NoServersError

    async def quiet(error: Exception) -> None:  # nats-py prints a traceback per failed attempt otherwise
        return None

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=[part.strip() for part in url.split(",")],
                name=name,
                connect_timeout=timeout,
                allow_reconnect=True,  # with False, nats-py 2.16 retries an unreachable server forever
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            ),
            timeout=timeout * 3,
        )
    except NoServersError:
        raise NatsUnreachable(f"no NATS server answered at {redact_url(url)}") from None
    except (TimeoutError, OSError) as exc:
        raise NatsUnreachable(f"NATS at {redact_url(url)} did not answer: {exc or type(exc).__name__}") from None


class NatsUnreachable(Exception):
    """No NATS server answered at the URL; the message names it."""


async def _check_nats(url: str) -> None:
    try:
        nc = await connect_nats(url, name="tessera-up")
    except NatsUnreachable as exc:
        raise StackError(str(exc)) from None
    try:
        await nc.jetstream().account_info()
    except Exception as exc:
        raise StackError(f"NATS at {redact_url(url)} has no JetStream (start nats-server with -js): {exc}") from None
    finally:
        await nc.close()
