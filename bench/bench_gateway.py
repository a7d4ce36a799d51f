"""Benchmark: GetWorkspace through the REST/JSON gateway (HTTP/1.1, keep-alive) vs direct gRPC, one run.

What is compared
- Direct: `tessera.tenancy.v1.TenancyService/GetWorkspace` over gRPC (HTTP/2) on the real tenancy
  process, with a real workspace token (auth enforced).
- Gateway: `GET /v1/workspaces/{id}` on the real gateway process (`python -m gateway.main`), HTTP/1.1
  with keep-alive, same token as a bearer header: routing, transcoding to protobuf, the gRPC call to
  the same tenancy process, canonical JSON out.
- Bare proxy (the ceiling; `--no-bare` skips it): the same URL served by this script in its own process
  (`--serve-bare-proxy`) with nothing but uvicorn (httptools, uvloop, no access log) + one Starlette route
  + one grpc.aio channel + MessageToDict: no route table, metadata rules, error mapping or middleware.
Every path is driven by `h2load` (nghttp2, C; `--h1` for HTTP/1.1): one connection per concurrent
stream, so at concurrency c every path has c requests in flight. Rounds are interleaved, the order of
the paths rotates from round to round, and medians are reported. Issue 4 targets (2 cores): gateway
throughput >= 75% of direct gRPC at c=64, and at most 1 ms added to p50 at c=1. Install the load
generator with `apt-get install nghttp2-client`.

On 2 cores every process shares the CPU with the others (PostgreSQL, tenancy, the proxy, h2load), so the
report also gives, per segment, the cores the machine spent outside this benchmark's processes ("other
load") and the cores the hypervisor kept from it ("steal"): figures taken while either is not near zero
are not comparable.

Usage: `python bench/bench_gateway.py [--seconds 6] [--rounds 3] [--concurrency 1 64] [--no-bare]`;
uses TESSERA_DATABASE_URL / TESSERA_NATS_URL (a superuser URL) when set, embedded servers otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from bench_get_workspace import (
    REPO,
    Caller,
    Result,
    bench_stack,
    grpc_frame,
    run_h2load,
    sign_up_with_workspace,
    start_service,
)

from gateway.descriptors import domains
from gateway.settings import address_variable
from migrations import runner
from tessera.tenancy.v1 import tenancy_service_pb2
from tessera_cli.embedded import free_port, wait_for_port

DIRECT = "gRPC direct"
GATEWAY = "REST via gateway (HTTP/1.1)"
BARE = "REST via bare proxy (HTTP/1.1)"
# A backend this benchmark does not start: the gateway's channels connect lazily and never call it.
UNUSED_BACKEND = "127.0.0.1:9"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one measured segment")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="measure the bare proxy")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the process under test in the first round (into DIR)"
    )
    parser.add_argument("--serve-bare-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare_proxy:
        serve_bare_proxy(args.port, args.backend)
        return
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-gw-"))
    with bench_stack(tmp) as stack:
        admin, nats_url, processes = stack.admin_url, stack.nats_url, stack.processes
        ports = {name: free_port() for name in ("identity", "tenancy", "tenancy_open", "gateway", "bare")}
        common = {
            **os.environ,
            **{address_variable(domain): UNUSED_BACKEND for domain in domains()},
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
        if args.bare:
            processes["bare"] = start_bare_proxy(ports["bare"], common["TESSERA_TENANCY_ADDRESS"], tmp / "bare.log")
            if not wait_for_port("127.0.0.1", ports["bare"], 30):
                raise SystemExit((tmp / "bare.log").read_text())
        caller: Caller = asyncio.run(sign_up_with_workspace(ports["identity"], ports["tenancy"], ports["tenancy_open"]))
        body = tmp / "get.bin"
        body.write_bytes(grpc_frame(tenancy_service_pb2.GetWorkspaceRequest(name=caller.workspace).SerializeToString()))
        rest_path = f"/v1/{caller.workspace}"
        profiled: set[tuple[str, int]] = set()

        def profile_path(process: str, c: int) -> Path | None:
            """The first segment of each process at each concurrency is sampled with --profile."""
            if args.profile is None or (process, c) in profiled:
                return None
            profiled.add((process, c))
            return args.profile / f"{process}-c{c}.txt"

        paths: list[tuple[str, Callable[[int], Result]]] = [
            (
                DIRECT,
                lambda c: run_h2load(
                    DIRECT, ports["tenancy"], caller.bearer_headers(), body, c, args.seconds, tmp, processes["tenancy"]
                ),
            ),
            (
                GATEWAY,
                lambda c: run_h2load(
                    GATEWAY,
                    ports["gateway"],
                    caller.bearer_headers(),
                    None,
                    c,
                    args.seconds,
                    tmp,
                    processes["gateway"],
                    path=rest_path,
                    http1=True,
                    profile=profile_path("gateway", c),
                ),
            ),
        ]
        if args.bare:
            paths.append(
                (
                    BARE,
                    lambda c: run_h2load(
                        BARE,
                        ports["bare"],
                        caller.bearer_headers(),
                        None,
                        c,
                        args.seconds,
                        tmp,
                        processes["bare"],
                        path=rest_path,
                        http1=True,
                        profile=profile_path("bare", c),
                    ),
                )
            )
        results: list[tuple[Result, float, float]] = []
        for c in args.concurrency:
            for round_number in range(args.rounds):
                # The paths take turns going first: machine drift and order effects hit them alike.
                shift = round_number % len(paths)
                for _label, run in paths[shift:] + paths[:shift]:
                    results.append(measure_outside(lambda c, run=run: run_again_if_cut(run, c), c))
        report(results)


def start_bare_proxy(port: int, backend: str, log_path: Path) -> psutil.Popen:
    """This script in `--serve-bare-proxy` mode, in its own process."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-bare-proxy",
        "--port",
        str(port),
        "--backend",
        backend,
    ]
    with log_path.open("wb") as log:
        return psutil.Popen(command, cwd=REPO, stdout=log, stderr=log)


def serve_bare_proxy(port: int, backend: str) -> None:
    """The ceiling: uvicorn + Starlette + grpc.aio, `GET /v1/workspaces/{id}` → GetWorkspace, nothing else."""
    import grpc
    import uvicorn
    from google.protobuf import json_format
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def app() -> Starlette:
        channel = grpc.aio.insecure_channel(backend)
        get_workspace = channel.unary_unary(
            "/tessera.tenancy.v1.TenancyService/GetWorkspace",
            request_serializer=tenancy_service_pb2.GetWorkspaceRequest.SerializeToString,
            response_deserializer=tenancy_service_pb2.GetWorkspaceResponse.FromString,
            _registered_method=True,
        )

        async def get(request: Request) -> JSONResponse:
            name = "workspaces/" + request.path_params["workspace"]
            reply = await get_workspace(
                tenancy_service_pb2.GetWorkspaceRequest(name=name),
                metadata=(("authorization", request.headers["authorization"]),),
                timeout=30,
            )
            return JSONResponse(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))

        return Starlette(routes=[Route("/v1/workspaces/{workspace}", get)])

    # The gateway's uvicorn settings (gateway.main.uvicorn_config): no access log, no proxy headers.
    uvicorn.run(
        app,
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        http="httptools",
    )


def run_again_if_cut(run: Callable[[int], Result], concurrency: int) -> Result:
    """One segment, run again (twice at most) when h2load logged a single request without a status.

    Over HTTP/1.1, h2load sometimes logs one request that straddles the end of its warm-up with status 0
    (not counted as failed by h2load itself); run_h2load rightly refuses such a segment.
    """
    for attempt in range(3):
        try:
            return run(concurrency)
        except SystemExit as exc:
            if attempt == 2 or not str(exc).startswith("h2load saw 1 non-200 responses"):
                raise
            print(f"segment run again: {str(exc).splitlines()[0]}", file=sys.stderr)
    raise AssertionError("unreachable")


def measure_outside(run: Callable[[int], Result], concurrency: int) -> tuple[Result, float, float]:
    """Run one segment; also the cores the machine spent outside this process tree meanwhile (other load),
    and the cores the hypervisor kept from this machine (steal)."""
    me = psutil.Process()
    before_tree = _tree_cpu(me)
    before = psutil.cpu_times()
    result = run(concurrency)
    after = psutil.cpu_times()
    after_tree = _tree_cpu(me)
    before_machine, after_machine = _busy(before), _busy(after)
    # h2load has exited by now: count the CPU run_h2load sampled for it.
    ours = sum(after_tree.get(pid, 0.0) - used for pid, used in before_tree.items() if pid in after_tree)
    ours += result.loadgen_cpu * result.seconds
    elapsed = result.seconds + 2  # h2load's warm-up included
    steal = (getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)) / elapsed
    return result, max(0.0, (after_machine - before_machine - ours) / elapsed), steal


def _busy(times: Any) -> float:
    return float(times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0))


def _tree_cpu(root: psutil.Process) -> dict[int, float]:
    used: dict[int, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        used[process.pid] = times.user + times.system
    return used


def report(results: list[tuple[Result, float, float]]) -> None:
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}; every segment:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | CPU of the process under test | other load | steal |")
    print("|---|---|---|---|---|---|---|---|")
    for r, other, steal in results:
        print(
            f"| {r.name} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.server_cpu or 0.0:.2f} | {other:.2f} | {steal:.2f} |"
        )
    print("\nmedians over the rounds:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | CPU of the process under test | other load | steal |")
    print("|---|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for key in sorted({(r.name, r.concurrency) for r, _, _ in results}, key=lambda k: (k[1], k[0])):
        rows = [(r, other, steal) for r, other, steal in results if (r.name, r.concurrency) == key]
        m = {
            "rps": statistics.median(r.rps for r, _, _ in rows),
            "p50": statistics.median(r.p50_ms for r, _, _ in rows),
            "p99": statistics.median(r.p99_ms for r, _, _ in rows),
            "cpu": statistics.median(r.server_cpu or 0.0 for r, _, _ in rows),
            "cpu_per_request": statistics.median((r.server_cpu or 0.0) / r.rps * 1e6 for r, _, _ in rows),
            "other": statistics.median(other for _, other, _ in rows),
            "steal": statistics.median(steal for _, _, steal in rows),
        }
        medians[key] = m
        print(
            f"| {key[0]} | {key[1]} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu']:.2f} "
            f"({m['cpu_per_request']:.0f} µs/request) | {m['other']:.2f} | {m['steal']:.2f} |"
        )
    for c in sorted({r.concurrency for r, _, _ in results}):
        direct = medians[(DIRECT, c)]
        for name in (GATEWAY, BARE):
            if (name, c) in medians:
                proxy = medians[(name, c)]
                print(
                    f"\nconcurrency {c}: {name} throughput {proxy['rps'] / direct['rps']:.0%} of direct gRPC; "
                    f"p50 +{proxy['p50'] - direct['p50']:.2f} ms; p99 +{proxy['p99'] - direct['p99']:.2f} ms"
                )


if __name__ == "__main__":
    main()
