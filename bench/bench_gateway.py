"""Benchmark: GetWorkspace through the REST/JSON gateway (HTTP/1.1, keep-alive) vs direct gRPC, one run.

What is compared
- Direct: `tessera.tenancy.v1.TenancyService/GetWorkspace` over gRPC (HTTP/2) on the real tenancy
  process, with a real workspace token (auth enforced).
- Gateway: `GET /v1/workspaces/{id}` on the real gateway process (`python -m gateway.main`), HTTP/1.1
  with keep-alive, same token as a bearer header: routing, transcoding to protobuf, the gRPC call to
  the same tenancy process, canonical JSON out.
Both are driven by `h2load` (nghttp2, C; `--h1` for the gateway): one connection per concurrent
stream, so at concurrency c both paths have c requests in flight. Rounds are interleaved and medians
reported. Issue 4 targets (2 cores): gateway throughput >= 75% of direct gRPC at c=64, and at most
1 ms added to p50 at c=1. Install the load generator with `apt-get install nghttp2-client`.

Usage: `python bench/bench_gateway.py [--seconds 6] [--rounds 3] [--concurrency 1 64]`; uses
TESSERA_DATABASE_URL / TESSERA_NATS_URL (a superuser URL) when set, embedded servers otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
from bench_get_workspace import (
    Caller,
    EmbeddedNats,
    EmbeddedPostgres,
    Result,
    _admin,
    grpc_frame,
    run_h2load,
    sign_up_with_workspace,
    start_service,
)

from migrations import runner
from tessera.tenancy.v1 import tenancy_service_pb2
from tessera_cli.embedded import free_port, wait_for_port

DIRECT = "gRPC direct"
GATEWAY = "REST via gateway (HTTP/1.1)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one measured segment")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-gw-"))
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
    processes: dict[str, psutil.Popen] = {}
    try:
        runner.bootstrap(admin)
        runner.upgrade(admin, "head")
        ports = {"identity": free_port(), "tenancy": free_port(), "tenancy_open": free_port(), "gateway": free_port()}
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
            # Only used to check the caller's development headers in sign_up_with_workspace.
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
        gateway_env = {
            **common,
            "TESSERA_GATEWAY_PORT": str(ports["gateway"]),
            "TESSERA_GATEWAY_LOG_LEVEL": "WARNING",
            # One load generator is one client: per-client rate limiting would measure the limiter.
            "TESSERA_GATEWAY_RATE_LIMIT__ENABLED": "false",
        }
        processes["gateway"] = start_service("gateway.main", gateway_env, tmp / "gateway.log")
        if not wait_for_port("127.0.0.1", ports["gateway"], 30):
            raise SystemExit((tmp / "gateway.log").read_text())
        caller: Caller = asyncio.run(sign_up_with_workspace(ports["identity"], ports["tenancy"], ports["tenancy_open"]))
        body = tmp / "get.bin"
        body.write_bytes(grpc_frame(tenancy_service_pb2.GetWorkspaceRequest(name=caller.workspace).SerializeToString()))
        results: list[Result] = []
        for c in args.concurrency:
            for _ in range(args.rounds):
                results.append(
                    run_h2load(
                        DIRECT,
                        ports["tenancy"],
                        caller.bearer_headers(),
                        body,
                        c,
                        args.seconds,
                        tmp,
                        processes["tenancy"],
                    )
                )
                results.append(
                    run_h2load(
                        GATEWAY,
                        ports["gateway"],
                        caller.bearer_headers(),
                        None,
                        c,
                        args.seconds,
                        tmp,
                        processes["gateway"],
                        path=f"/v1/{caller.workspace}",
                        http1=True,
                    )
                )
        report(results)
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(20)
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        for s in servers:
            s.stop()


def report(results: list[Result]) -> None:
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}; medians over the rounds:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | server CPU (process under test) |")
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for key in sorted({(r.name, r.concurrency) for r in results}, key=lambda k: (k[1], k[0])):
        rows = [r for r in results if (r.name, r.concurrency) == key]
        m = {
            "rps": statistics.median(r.rps for r in rows),
            "p50": statistics.median(r.p50_ms for r in rows),
            "p99": statistics.median(r.p99_ms for r in rows),
            "cpu": statistics.median(r.server_cpu or 0.0 for r in rows),
        }
        medians[key] = m
        print(f"| {key[0]} | {key[1]} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu']:.2f} |")
    for c in sorted({r.concurrency for r in results}):
        direct, gateway = medians[(DIRECT, c)], medians[(GATEWAY, c)]
        print(
            f"\nconcurrency {c}: gateway throughput {gateway['rps'] / direct['rps']:.0%} of direct gRPC; "
            f"p50 +{gateway['p50'] - direct['p50']:.2f} ms; p99 +{gateway['p99'] - direct['p99']:.2f} ms"
        )


if __name__ == "__main__":
    main()
