"""Benchmark: tenancy GetWorkspace over gRPC, with and without auth, vs a raw asyncpg RLS transaction.

What is compared, in one run
- RPC, auth enforced: `tessera.tenancy.v1.TenancyService/GetWorkspace` served by the real service
  process (`python -m services.tenancy.main`) next to a real identity process: a real workspace
  token (sign-up, sign-in, IssueWorkspaceToken) verified locally against identity's JWKS, revocation
  check, role-matrix authorization, protovalidate, error mapping, logging, metrics, a unit of work that
  sets the tenant transaction-locally, and a primary-key SELECT under forced RLS.
- RPC, auth disabled: a second tenancy process on the same database with TESSERA_AUTH=disabled and
  the same user, workspace and role given as development headers: the difference is what token
  verification and authorization cost (issue 3 target: < 15% added latency at concurrency 64).
- Raw: asyncpg, same login role, same database: BEGIN; set_config(tenant, subject); the same
  primary-key SELECT; COMMIT — the smallest honest version of what the RPC must do.

Load generator
- gRPC: `h2load` (nghttp2, C) speaking gRPC over HTTP/2 with a pre-encoded request frame, one
  connection per concurrent stream; it is not the bottleneck (its CPU time is printed). Every
  response is checked for `grpc-status: 0` once before the run, and h2load's per-request log must
  show only HTTP 200s. Install it with `apt-get install nghttp2-client`.
- Raw: asyncpg tasks in a separate process.

Usage: `python bench/bench_get_workspace.py [--seconds 6] [--rounds 3] [--concurrency 1 64]`; the three paths
run in interleaved rounds and the report gives every segment and the medians.
Uses TESSERA_DATABASE_URL / TESSERA_NATS_URL (superuser URL of a server) when set, embedded
servers otherwise. Results are printed as a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import psutil

from migrations import runner
from tessera.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera_cli.embedded import EmbeddedNats, EmbeddedPostgres, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent

METHOD = "/tessera.tenancy.v1.TenancyService/GetWorkspace"
AUTH_ON = "gRPC GetWorkspace (auth enforced)"
AUTH_OFF = "gRPC GetWorkspace (auth disabled)"
RAW = "raw asyncpg RLS transaction"


@dataclass
class Result:
    name: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    loadgen_cpu: float
    server_cpu: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling process `pid` for `seconds` (collapsed stacks to `output`); needs `pip install py-spy`."""
    executable = Path(sys.executable).with_name("py-spy")
    if not executable.exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [str(executable), "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "250"]
    command += ["--format", "raw", "--output", str(output)]
    # C frames too (grpc, asyncpg, protobuf): py-spy then pauses the process for each sample.
    command.append("--native" if os.environ.get("BENCH_PY_SPY_NATIVE") else "--nonblocking")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def run_h2load(
    label: str,
    port: int,
    headers: list[str],
    body: Path | None,
    concurrency: int,
    seconds: float,
    tmp: Path,
    service: psutil.Process,
    *,
    path: str = METHOD,
    http1: bool = False,
    profile: Path | None = None,
) -> Result:
    """One h2load segment: gRPC (a POST of `body` over HTTP/2) or, with `http1`, plain HTTP/1.1 requests.

    With `profile`, py-spy samples `service` for the segment and writes its collapsed stacks there
    (`bench/profile_summary.py` reads them).
    """
    log = tmp / f"h2load-{uuid.uuid4().hex[:8]}.log"
    header_args = [arg for header in headers for arg in ("-H", header)]
    cmd = [
        "h2load",
        f"http://127.0.0.1:{port}{path}",
        "-c",
        str(concurrency),
        "-m",
        "1",
        "-t",
        "1",
        "-D",
        str(round(seconds)),
        "--warm-up-time=2",
        *(["--h1"] if http1 else []),
        *(["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"] if body else []),
        *header_args,
        "--log-file",
        str(log),
    ]
    sampler = py_spy(service.pid, seconds + 2, profile) if profile else None
    service_before = service.cpu_times()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cpu = 0.0
    while proc.poll() is None:
        try:
            times = proc.cpu_times()
            cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)  # sampling h2load's CPU time while it runs (a script, not a test)
    service_after = service.cpu_times()
    if sampler is not None:
        sampler.wait(30)
    service_cpu = (service_after.user + service_after.system - service_before.user - service_before.system) / (
        seconds + 2
    )  # h2load's warm-up included
    out = proc.stdout.read().decode() if proc.stdout else ""
    if not log.exists():
        raise SystemExit(f"h2load wrote no log:\n{out}")
    durations = []
    bad = 0
    for line in log.read_text().splitlines():
        _start, status, micros = line.split("\t")[:3]
        if status != "200":
            bad += 1
        durations.append(int(micros) / 1000.0)
    if bad or not durations:
        raise SystemExit(f"h2load saw {bad} non-200 responses / {len(durations)} requests:\n{out}")
    return Result(
        label,
        concurrency,
        len(durations),
        seconds,
        percentile(durations, 0.5),
        percentile(durations, 0.99),
        sum(durations) / len(durations),
        cpu / seconds,
        service_cpu,
    )


def run_raw(url: str, ws: str, concurrency: int, seconds: float) -> Result:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("raw_rls_select.py")),
            url,
            ws,
            str(concurrency),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return Result(
        RAW,
        concurrency,
        data["n"],
        data["seconds"],
        data["p50"],
        data["p99"],
        data["mean"],
        data["cpu"],
    )


@dataclass
class Caller:
    """A real user with a workspace: its workspace token, and the same identity as development headers."""

    workspace: str
    user_id: str
    token: str

    def bearer_headers(self) -> list[str]:
        return [f"authorization: Bearer {self.token}"]

    def development_headers(self) -> list[str]:
        return [
            f"x-tessera-dev-user: {self.user_id}",
            f"x-tessera-dev-workspace: {self.workspace.split('/', 1)[1]}",
            "x-tessera-dev-role: owner",
        ]


async def sign_up_with_workspace(identity_port: int, tenancy_port: int, open_port: int) -> Caller:
    """Sign up and in, create a workspace, exchange for a workspace token; check both servers answer."""
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{identity_port}") as identity_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{tenancy_port}") as tenancy_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{open_port}") as open_channel,
    ):
        identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
        tenancy = tenancy_service_pb2_grpc.TenancyServiceStub(tenancy_channel)
        email, password = f"bench.{uuid.uuid4().hex[:8]}@example.com", "bench staple horse battery 9"
        await identity.SignUp(identity_service_pb2.SignUpRequest(email=email, password=password, display_name="B"))
        signed_in = await identity.SignIn(identity_service_pb2.SignInRequest(email=email, password=password))
        user = (("authorization", f"Bearer {signed_in.tokens.access_token}"),)
        created = await tenancy.CreateWorkspace(
            tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="bench")),
            metadata=user,
        )
        issued = await identity.IssueWorkspaceToken(
            identity_service_pb2.IssueWorkspaceTokenRequest(workspace=created.workspace.name), metadata=user
        )
        caller = Caller(created.workspace.name, signed_in.user.name.split("/", 1)[1], issued.tokens.access_token)
        request = tenancy_service_pb2.GetWorkspaceRequest(name=caller.workspace)
        bearer = tuple(tuple(h.split(": ", 1)) for h in caller.bearer_headers())
        development = tuple(tuple(h.split(": ", 1)) for h in caller.development_headers())
        got = await tenancy.GetWorkspace(request, metadata=bearer)
        also = await tenancy_service_pb2_grpc.TenancyServiceStub(open_channel).GetWorkspace(
            request, metadata=development
        )
        assert got.workspace.name == also.workspace.name == caller.workspace
        return caller


def start_service(module: str, env: dict[str, str], log_path: Path) -> psutil.Popen:
    with log_path.open("wb") as log:
        return psutil.Popen([sys.executable, "-m", module], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class BenchStack:
    """What `bench_stack` provides: a fresh database migrated to head, NATS, and the processes to stop."""

    admin_url: str  # superuser URL of the benchmark's own database
    nats_url: str
    processes: dict[str, psutil.Popen]


@contextlib.contextmanager
def bench_stack(tmp: Path, *, keep: bool = False) -> Iterator[BenchStack]:
    """Servers (TESSERA_DATABASE_URL / TESSERA_NATS_URL, embedded ones in `tmp` otherwise) and a new
    database migrated to head. On exit the processes the benchmark added to `processes` are stopped,
    the database is dropped (kept with `keep`: its URL is printed) and embedded servers stop."""
    servers: list[EmbeddedPostgres | EmbeddedNats] = []
    server_url = os.environ.get("TESSERA_DATABASE_URL")
    nats_url = os.environ.get("TESSERA_NATS_URL")
    if not server_url:
        pg = EmbeddedPostgres(tmp / "pg").start()
        servers.append(pg)
        server_url = pg.url()
    if not nats_url:
        nats = EmbeddedNats(tmp / "nats").start()
        servers.append(nats)
        nats_url = nats.url
    dbname = f"tessera_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{dbname}"'))
    admin = server_url.rsplit("/", 1)[0] + "/" + dbname
    stack = BenchStack(admin, nats_url, {})
    try:
        runner.bootstrap(admin)
        runner.upgrade(admin, "head")
        yield stack
    finally:
        for process in stack.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):  # one that failed to start is gone already
                process.terminate()
                process.wait(20)
        if keep:
            print(f"kept the database: {admin}")
        else:
            asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one measured segment")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency (medians reported)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    with bench_stack(tmp) as stack:
        admin, nats_url, processes = stack.admin_url, stack.nats_url, stack.processes
        ports = {"identity": free_port(), "tenancy": free_port(), "tenancy_open": free_port()}
        common = {
            **os.environ,
            "TESSERA_NATS_URL": nats_url,
            "TESSERA_LOG_LEVEL": "WARNING",
            "TESSERA_DB_POOL_SIZE": "20",
            "TESSERA_IDENTITY_ADDRESS": f"127.0.0.1:{ports['identity']}",
            "TESSERA_TENANCY_ADDRESS": f"127.0.0.1:{ports['tenancy']}",
        }
        tenancy_url = runner.service_url(admin, "tenancy")
        plan = {
            "identity": ("services.identity.main", {"TESSERA_DATABASE_URL": runner.service_url(admin, "identity")}),
            "tenancy": ("services.tenancy.main", {"TESSERA_DATABASE_URL": tenancy_url}),
            # The same service with authentication and authorization switched off (development headers).
            "tenancy_open": (
                "services.tenancy.main",
                {"TESSERA_DATABASE_URL": tenancy_url, "TESSERA_AUTH": "disabled"},
            ),
        }
        for name, (module, env) in plan.items():
            processes[name] = start_service(
                module, {**common, **env, "TESSERA_GRPC_PORT": str(ports[name])}, tmp / f"{name}.log"
            )
            if not wait_for_port("127.0.0.1", ports[name], 30):
                raise SystemExit((tmp / f"{name}.log").read_text())
        caller = asyncio.run(sign_up_with_workspace(ports["identity"], ports["tenancy"], ports["tenancy_open"]))
        ws_id = caller.workspace.split("/", 1)[1]
        body = tmp / "get.bin"
        body.write_bytes(grpc_frame(tenancy_service_pb2.GetWorkspaceRequest(name=caller.workspace).SerializeToString()))
        results: list[Result] = []
        for c in args.concurrency:
            # Interleaved rounds, alternating which RPC path goes first: machine drift and order effects
            # hit the paths alike instead of one of them.
            for round_number in range(args.rounds):
                segments = [
                    (AUTH_ON, ports["tenancy"], caller.bearer_headers(), processes["tenancy"]),
                    (AUTH_OFF, ports["tenancy_open"], caller.development_headers(), processes["tenancy_open"]),
                ]
                if round_number % 2:
                    segments.reverse()
                for label, port, headers, process in segments:
                    results.append(run_h2load(label, port, headers, body, c, args.seconds, tmp, process))
                results.append(run_raw(tenancy_url, ws_id, c, args.seconds))
        print_report(results)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def print_report(results: list[Result]) -> None:
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}; every segment:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | mean ms | load generator CPU | service CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        server = f"{r.server_cpu:.2f}" if r.server_cpu is not None else "—"
        print(
            f"| {r.name} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.mean_ms:.2f} "
            f"| {r.loadgen_cpu:.2f} | {server} |"
        )
    print("\nmedians over the rounds:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for key in sorted({(r.name, r.concurrency) for r in results}, key=lambda k: (k[1], k[0])):
        rows = [r for r in results if (r.name, r.concurrency) == key]
        m = {
            "rps": statistics.median(r.rps for r in rows),
            "p50": statistics.median(r.p50_ms for r in rows),
            "p99": statistics.median(r.p99_ms for r in rows),
            "mean": statistics.median(r.mean_ms for r in rows),
        }
        medians[key] = m
        print(f"| {key[0]} | {key[1]} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['mean']:.2f} |")
    for c in sorted({r.concurrency for r in results}):
        on, off, raw = medians[(AUTH_ON, c)], medians[(AUTH_OFF, c)], medians[(RAW, c)]
        print(
            f"\nconcurrency {c}: RPC/raw throughput {on['rps'] / raw['rps']:.0%}; RPC p50 {on['p50']:.2f} ms; "
            f"auth adds {on['mean'] / off['mean'] - 1:+.1%} to mean latency, {on['p50'] / off['p50'] - 1:+.1%} to p50 "
            f"(throughput {on['rps'] / off['rps']:.0%} of auth disabled)"
        )


if __name__ == "__main__":
    main()
