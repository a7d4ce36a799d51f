"""Benchmark: tenancy GetWorkspace over gRPC vs a raw asyncpg RLS transaction, in one run.

What is compared
- RPC: `tessera.tenancy.v1.TenancyService/GetWorkspace` served by the real service process
  (`python -m services.tenancy.main`): full interceptor chain (OpenTelemetry, request id, principal,
  protovalidate, error mapping, logging, metrics), a unit of work that sets the tenant
  transaction-locally, and a primary-key SELECT under forced RLS, as the service login role.
- Raw: asyncpg, same login role, same database: BEGIN; set_config(tenant, subject); the same
  primary-key SELECT; COMMIT — the smallest honest version of what the RPC must do.

Load generator
- gRPC: `h2load` (nghttp2, C) speaking gRPC over HTTP/2 with a pre-encoded request frame, one
  connection per concurrent stream; it is not the bottleneck (its CPU time is printed). Every
  response is checked for `grpc-status: 0` once before the run, and h2load's per-request log must
  show only HTTP 200s. Install it with `apt-get install nghttp2-client`.
- Raw: asyncpg tasks in a separate process.

Usage: `python bench/bench_get_workspace.py [--seconds 10] [--concurrency 1 64]`.
Uses TESSERA_DATABASE_URL / TESSERA_NATS_URL (superuser URL of a server) when set, embedded
servers otherwise. Results are printed as a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import psutil

from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from migrations import runner  # noqa: E402
from tessera_cli.embedded import EmbeddedNats, EmbeddedPostgres, free_port, wait_for_port  # noqa: E402

METHOD = "/tessera.tenancy.v1.TenancyService/GetWorkspace"
BENCH_USER = "0190a000-0000-7000-8000-0000000be0c4"


@dataclass
class Result:
    name: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float
    server_cpu: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def run_h2load(port: int, body: Path, concurrency: int, seconds: float, tmp: Path, service: psutil.Process) -> Result:
    log = tmp / f"h2load-{concurrency}.log"
    cmd = [
        "h2load",
        f"http://127.0.0.1:{port}{METHOD}",
        "-c",
        str(concurrency),
        "-m",
        "1",
        "-t",
        "1",
        "-D",
        str(round(seconds)),
        "--warm-up-time=2",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"x-tessera-dev-user: {BENCH_USER}",
        "--log-file",
        str(log),
    ]
    service_before = service.cpu_times()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cpu = 0.0
    while proc.poll() is None:
        try:
            times = proc.cpu_times()
            cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    service_after = service.cpu_times()
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
        "gRPC GetWorkspace",
        concurrency,
        len(durations),
        seconds,
        percentile(durations, 0.5),
        percentile(durations, 0.99),
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
            BENCH_USER,
            str(concurrency),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return Result(
        "raw asyncpg RLS transaction", concurrency, data["n"], data["seconds"], data["p50"], data["p99"], data["cpu"]
    )


async def create_workspace(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)
        md = (("x-tessera-dev-user", BENCH_USER),)
        created = await stub.CreateWorkspace(
            tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="bench")),
            metadata=md,
        )
        got = await stub.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=created.workspace.name), metadata=md)
        assert got.workspace.name == created.workspace.name
        return created.workspace.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
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
    service = None
    try:
        runner.bootstrap(admin)
        runner.upgrade(admin, "head")
        svc_url = runner.service_url(admin, "tenancy")
        port = free_port()
        env = {
            **os.environ,
            "TESSERA_DATABASE_URL": svc_url,
            "TESSERA_NATS_URL": nats_url,
            "TESSERA_GRPC_PORT": str(port),
            "TESSERA_AUTH": "development",
            "TESSERA_LOG_LEVEL": "WARNING",
            "TESSERA_DB_POOL_SIZE": "20",
        }
        log = (tmp / "service.log").open("wb")
        service = psutil.Popen(
            [sys.executable, "-m", "services.tenancy.main"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if not wait_for_port("127.0.0.1", port, 30):
            raise SystemExit((tmp / "service.log").read_text())
        name = asyncio.run(create_workspace(port))
        ws_id = name.split("/", 1)[1]
        body = tmp / "get.bin"
        body.write_bytes(grpc_frame(tenancy_service_pb2.GetWorkspaceRequest(name=name).SerializeToString()))
        results: list[Result] = []
        for c in args.concurrency:
            results.append(run_h2load(port, body, c, args.seconds, tmp, service))
            results.append(run_raw(svc_url, ws_id, c, args.seconds))
        print_report(results)
    finally:
        if service is not None:
            service.terminate()
            service.wait(20)
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        for s in servers:
            s.stop()


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def print_report(results: list[Result]) -> None:
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | load generator CPU (cores) | service CPU (cores) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        server = f"{r.server_cpu:.2f}" if r.server_cpu is not None else "—"
        print(
            f"| {r.name} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.loadgen_cpu:.2f} | {server} |"
        )
    by_c: dict[int, dict[str, Result]] = {}
    for r in results:
        by_c.setdefault(r.concurrency, {})[r.name] = r
    for c, pair in sorted(by_c.items()):
        rpc, raw = pair["gRPC GetWorkspace"], pair["raw asyncpg RLS transaction"]
        print(f"\nconcurrency {c}: RPC/raw throughput ratio {rpc.rps / raw.rps:.0%}; RPC p50 {rpc.p50_ms:.2f} ms")


if __name__ == "__main__":
    main()
