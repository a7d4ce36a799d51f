"""Benchmark: workflow ListItems (filter + order + page of 50) and CreateItem over gRPC, vs raw asyncpg.

What is measured, in one run (issue 5)
- Data: 1,000,000 items over 1,000 workspaces, one of which holds 100,000 (the one queried). The big
  workspace and its project are real (sign-up, CreateWorkspace, CreateProject with the default
  workflow, through the services); the items and the 999 other workspaces' projects are bulk-loaded
  with COPY as the database superuser (RLS does not apply to it), then ANALYZEd.
- gRPC ListItems: `tessera.workflow.v1.WorkflowService/ListItems` on the real workflow process (auth
  enforced with a real workspace token) with a filter, an order_by and page_size 50.
- gRPC CreateItem: the real RPC (quota check, project lookup, insert, activity row, outbox event).
- Floor: bench/floor_list_server.py, a bare grpc.aio server whose ListItems only runs the same
  transaction on an asyncpg pool and answers with a response serialized once: what a Python gRPC
  service running this SQL cannot beat here.
- Raw: asyncpg in its own process, as the workflow login role under RLS: for the list, BEGIN,
  set_config, the very SQL the service runs for that request once it knows the project (compiled by
  services.workflow.query, with the project's custom field definitions beside the rows), COMMIT; for
  the create, BEGIN, set_config, INSERT item + INSERT activity + INSERT outbox row (an envelope of the
  size the service writes), COMMIT.
Load generator: h2load (C) with a pre-encoded gRPC frame, one connection per concurrent stream; its
CPU use is printed. Targets (2 cores): ListItems p99 < 25 ms on the 100,000-item workspace at
concurrency 32; CreateItem >= 40% of the raw transaction's throughput at concurrency 32.

Usage: `python bench/bench_workflow.py [--seconds 6] [--rounds 3] [--concurrency 32]`; uses
TESSERA_DATABASE_URL / TESSERA_NATS_URL (superuser URL) when set, embedded servers otherwise.
Needs `apt-get install nghttp2-client`. Seeding takes a few minutes and prints its progress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import grpc
import psutil
from bench_get_workspace import (
    Result,
    bench_stack,
    grpc_frame,
    run_h2load,
    sign_up_with_workspace,
    start_service,
)

from migrations import runner
from services.kit.ids import uuid7
from services.kit.sql import Query
from services.workflow.query import ItemQuery, compile_list
from services.workflow.repository import with_project_custom_fields
from tessera.workflow.v1 import workflow_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from tessera_cli.embedded import free_port, wait_for_port

TOTAL_ITEMS = 1_000_000
WORKSPACES = 1_000
BIG_WORKSPACE_ITEMS = 100_000
LABELS = ("bug", "feature", "chore", "ux", "backend", "frontend", "security", "docs", "infra", "perf")
WORDS = (
    "invoice",
    "export",
    "fails",
    "when",
    "the",
    "workspace",
    "has",
    "archived",
    "members",
    "search",
    "index",
    "refresh",
    "retry",
    "queue",
    "billing",
    "webhook",
    "signature",
    "onboarding",
    "flow",
    "dark",
    "mode",
    "timezone",
    "calendar",
    "sync",
    "upload",
    "large",
    "files",
    "permission",
    "matrix",
    "audit",
    "trail",
    "notification",
    "digest",
    "mobile",
    "layout",
    "keyboard",
    "shortcuts",
)
LIST_FILTER_TEMPLATE = 'status = "{status}" AND priority >= PRIORITY_HIGH'
LIST_ORDER = "priority desc, create_time desc"

LIST = "gRPC ListItems (filter, order, 50)"
FLOOR = "floor: bare grpc.aio + asyncpg, same SQL"
RAW_LIST = "raw asyncpg: same list SQL"
CREATE = "gRPC CreateItem"
RAW_CREATE = "raw asyncpg: insert item + activity + outbox"


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _items(
    rng: random.Random, tenant: uuid.UUID, project: uuid.UUID, count: int, states: list[tuple[str, str]], now: datetime
) -> list[tuple[Any, ...]]:
    rows = []
    for _ in range(count):
        status, category = rng.choice(states)
        created = now - timedelta(seconds=rng.randrange(365 * 86400))
        rows.append(
            (
                tenant,
                uuid7(),
                project,
                _text(rng, rng.randint(3, 9)).capitalize(),
                _text(rng, rng.randint(10, 40)),
                status,
                category,
                rng.randint(0, 4),
                sorted(set(rng.sample(LABELS, rng.randint(0, 3)))),
                created + timedelta(days=rng.randint(1, 90)) if rng.random() < 0.5 else None,
                "users/bench",
                "users/bench",
                created,
                created,
            )
        )
    return rows


ITEM_COLUMNS = [
    "tenant_id",
    "id",
    "project_id",
    "title",
    "description",
    "status",
    "status_category",
    "priority",
    "labels",
    "due_time",
    "creator",
    "updater",
    "create_time",
    "update_time",
]


async def seed(admin: str, big_tenant: uuid.UUID, big_project: uuid.UUID) -> list[tuple[str, str]]:
    """Bulk-load the items (and the 999 other workspaces' projects); returns the workflow's (state, category)."""
    conn = await asyncpg.connect(admin)
    try:
        project = await conn.fetchrow(
            "SELECT * FROM workflow.projects WHERE tenant_id = $1 AND id = $2", big_tenant, big_project
        )
        assert project is not None, "the benchmark project is not in workflow.projects"
        workflow = project["workflow"]
        spec = json.loads(workflow) if isinstance(workflow, str) else workflow
        states = [(state["id"], state["category"]) for state in spec["states"]]
        rng = random.Random(5)
        now = datetime.now(UTC)
        others = [(uuid7(), uuid7()) for _ in range(WORKSPACES - 1)]
        await conn.copy_records_to_table(
            "projects",
            schema_name="workflow",
            columns=["tenant_id", "id", "display_name", "workflow", "custom_fields", "creator"],
            records=[(t, p, "seeded", project["workflow"], project["custom_fields"], "users/bench") for t, p in others],
        )
        per_other = (TOTAL_ITEMS - BIG_WORKSPACE_ITEMS) // len(others)
        plan = [(big_tenant, big_project, BIG_WORKSPACE_ITEMS)] + [(t, p, per_other) for t, p in others]
        loaded = 0
        started = time.perf_counter()
        batch: list[tuple[Any, ...]] = []
        for index, (tenant, proj, count) in enumerate(plan):
            batch.extend(_items(rng, tenant, proj, count, states, now))
            if len(batch) >= 50_000 or index == len(plan) - 1:
                await conn.copy_records_to_table("items", schema_name="workflow", columns=ITEM_COLUMNS, records=batch)
                loaded += len(batch)
                batch = []
                print(f"  seeded {loaded:,} items ({time.perf_counter() - started:.0f} s)", flush=True)
        await conn.execute(
            # The live-item counter, spread over the shards as the service keeps it (each within its share).
            "INSERT INTO workflow.usage (tenant_id, shard, item_count) "
            "SELECT c.tenant_id, s, c.n / 16 + CASE WHEN s < c.n % 16 THEN 1 ELSE 0 END "
            "FROM (SELECT tenant_id, count(*) AS n FROM workflow.items GROUP BY tenant_id) AS c, "
            "generate_series(0, 15) AS s "
            "ON CONFLICT (tenant_id, shard) DO UPDATE SET item_count = excluded.item_count"
        )
        # Settle the bulk load before measuring: statistics, visibility map and hint bits (so autovacuum
        # does not start mid-measurement), and a checkpoint (so its writes do not either).
        print("  VACUUM (ANALYZE) and CHECKPOINT ...", flush=True)
        await conn.execute("VACUUM (ANALYZE) workflow.items")
        await conn.execute("VACUUM (ANALYZE) workflow.projects")
        await conn.execute("VACUUM (ANALYZE) workflow.usage")
        await conn.execute("CHECKPOINT")
        return states
    finally:
        await conn.close()


def raw_run(job: dict[str, Any], concurrency: int, seconds: float, tmp: Path) -> Result:
    """Run bench/raw_workflow.py in its own process on a pickled job."""
    path = tmp / f"raw-{uuid.uuid4().hex[:8]}.pickle"
    path.write_bytes(pickle.dumps({**job, "concurrency": concurrency, "seconds": seconds}))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("raw_workflow.py")), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the raw baseline failed:\n{done.stderr}")
    out = done.stdout
    data = json.loads(out.strip().splitlines()[-1])
    return Result(
        job["label"], concurrency, data["n"], data["seconds"], data["p50"], data["p99"], data["mean"], data["cpu"]
    )


async def create_project(port: int, token: str, workspace: str) -> workflow_pb2.Project:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        created = await stub.CreateProject(
            workflow_service_pb2.CreateProjectRequest(
                parent=workspace, project=workflow_pb2.Project(display_name="bench")
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        return created.project


async def check_rpcs(port: int, token: str, requests: dict[str, Any], list_responses: list[bytes]) -> dict[str, int]:
    """Call each benchmarked RPC once (it must succeed); returns the size of each response, and appends
    the serialized ListItems response to `list_responses`."""
    sizes = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        listed = await stub.ListItems(requests["list"], metadata=metadata)
        assert len(listed.items) == 50, f"the benchmark list returned {len(listed.items)} items, not a full page"
        sizes["list"] = listed.ByteSize()
        list_responses.append(listed.SerializeToString())
        created = await stub.CreateItem(requests["create"], metadata=metadata)
        sizes["create"] = created.ByteSize()
    return sizes


async def outbox_envelope(url: str) -> bytes:
    conn = await asyncpg.connect(url)
    try:
        envelope = await conn.fetchval("SELECT envelope FROM workflow.outbox ORDER BY created_at DESC LIMIT 1")
        if envelope is None:  # the relay already published it: rebuild a same-sized stand-in
            return os.urandom(600)
        return bytes(envelope)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one measured segment")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--keep", action="store_true", help="keep the seeded database (its URL is printed)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="workflow processes serving the one port (SO_REUSEPORT, as replicas behind a balancer would)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the service in the first round's gRPC segments (into DIR)"
    )
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-wf-"))
    with bench_stack(tmp, keep=args.keep) as stack:
        admin, nats_url, processes = stack.admin_url, stack.nats_url, stack.processes
        ports = {name: free_port() for name in ("identity", "tenancy", "tenancy_open", "workflow")}
        common = {
            **os.environ,
            "TESSERA_NATS_URL": nats_url,
            "TESSERA_LOG_LEVEL": "WARNING",
            # As many connections as the raw baseline opens (one per concurrent request).
            "TESSERA_DB_POOL_SIZE": str(max(args.concurrency)),
            "TESSERA_GRPC_REUSE_PORT": "true" if args.replicas > 1 else "false",
            "TESSERA_IDENTITY_ADDRESS": f"127.0.0.1:{ports['identity']}",
            "TESSERA_TENANCY_ADDRESS": f"127.0.0.1:{ports['tenancy']}",
        }
        tenancy_url = runner.service_url(admin, "tenancy")
        workflow_url = runner.service_url(admin, "workflow")
        plan = {
            "identity": ("services.identity.main", {"TESSERA_DATABASE_URL": runner.service_url(admin, "identity")}),
            "tenancy": ("services.tenancy.main", {"TESSERA_DATABASE_URL": tenancy_url}),
            "tenancy_open": (
                "services.tenancy.main",
                {"TESSERA_DATABASE_URL": tenancy_url, "TESSERA_AUTH": "disabled"},
            ),
            "workflow": ("services.workflow.main", {"TESSERA_DATABASE_URL": workflow_url}),
        }
        for name, (module, env) in plan.items():
            processes[name] = start_service(
                module, {**common, **env, "TESSERA_GRPC_PORT": str(ports[name])}, tmp / f"{name}.log"
            )
            if not wait_for_port("127.0.0.1", ports[name], 30):
                raise SystemExit((tmp / f"{name}.log").read_text())
        replicas = [processes["workflow"]]
        for index in range(1, args.replicas):
            module, env = plan["workflow"]
            replica = start_service(
                module, {**common, **env, "TESSERA_GRPC_PORT": str(ports["workflow"])}, tmp / f"workflow-{index}.log"
            )
            processes[f"workflow-{index}"] = replica
            replicas.append(replica)
            if not wait_for_listen(replica, ports["workflow"], 30):
                raise SystemExit((tmp / f"workflow-{index}.log").read_text())
        workflow = ProcessGroup(replicas)
        caller = asyncio.run(sign_up_with_workspace(ports["identity"], ports["tenancy"], ports["tenancy_open"]))
        project = asyncio.run(create_project(ports["workflow"], caller.token, caller.workspace))
        tenant = uuid.UUID(caller.workspace.split("/", 1)[1])
        project_id = uuid.UUID(project.name.rsplit("/", 1)[1])
        print(f"seeding {TOTAL_ITEMS:,} items over {WORKSPACES:,} workspaces ...", flush=True)
        states = asyncio.run(seed(admin, tenant, project_id))
        status = next(state for state, category in states if category == "ACTIVE")
        list_filter = LIST_FILTER_TEMPLATE.format(status=status)
        requests = {
            "list": workflow_service_pb2.ListItemsRequest(
                parent=project.name, filter=list_filter, order_by=LIST_ORDER, page_size=50
            ),
            "create": workflow_service_pb2.CreateItemRequest(
                parent=project.name,
                item=workflow_pb2.Item(
                    title="Benchmark item", description="created by bench_workflow.py", labels=["bench"]
                ),
            ),
        }
        list_responses: list[bytes] = []
        sizes = asyncio.run(check_rpcs(ports["workflow"], caller.token, requests, list_responses))
        print(f"filter: {list_filter!r}; order_by: {LIST_ORDER!r}; response bytes: {sizes}", flush=True)
        bodies = {}
        for key, request in (("ListItems", requests["list"]), ("CreateItem", requests["create"])):
            bodies[key] = tmp / f"{key}.bin"
            bodies[key].write_bytes(grpc_frame(request.SerializeToString()))

        # The service's own statement, compiled for asyncpg as its unit of work compiles it (kit.sql.Query).
        item_query = ItemQuery(tenant_id=tenant, project_id=project_id, filter=list_filter, order_by=LIST_ORDER)
        list_query = Query(with_project_custom_fields(compile_list(item_query, {}).statement(None, 51), item_query))
        raw_list = {
            "label": RAW_LIST,
            "kind": "list",
            "url": workflow_url,
            "tenant": str(tenant),
            "sql": list_query.sql,
            "params": list_query.arguments({}),
        }
        raw_create = {
            "label": RAW_CREATE,
            "kind": "create",
            "url": workflow_url,
            "tenant": str(tenant),
            "project": project_id,
            "envelope": asyncio.run(outbox_envelope(admin)),
        }
        floor_job = {
            "url": workflow_url,
            "tenant": str(tenant),
            "sql": list_query.sql,
            "params": list_query.arguments({}),
            "response": list_responses[0],
            "pool_size": max(args.concurrency),
        }
        results: list[Result] = []
        for c in args.concurrency:
            for round_number in range(args.rounds):
                pair = [("ListItems", LIST, raw_list), ("CreateItem", CREATE, raw_create)]
                if round_number % 2:
                    pair.reverse()
                for key, label, raw in pair:
                    results.append(
                        run_h2load(
                            label,
                            ports["workflow"],
                            caller.bearer_headers(),
                            bodies[key],
                            c,
                            args.seconds,
                            tmp,
                            workflow,
                            path=f"/tessera.workflow.v1.WorkflowService/{key}",
                            profile=args.profile / f"{key}-c{c}.txt" if args.profile and round_number == 0 else None,
                        )
                    )
                    results.append(raw_run(raw, c, args.seconds, tmp))
                    if key == "ListItems":
                        with floor_server(floor_job, tmp) as (floor_port, floor):
                            results.append(
                                run_h2load(
                                    FLOOR,
                                    floor_port,
                                    [],
                                    bodies[key],
                                    c,
                                    args.seconds,
                                    tmp,
                                    floor,
                                    path=f"/tessera.workflow.v1.WorkflowService/{key}",
                                )
                            )
        report(results)


@contextlib.contextmanager
def floor_server(job: dict[str, Any], tmp: Path) -> Iterator[tuple[int, ProcessGroup]]:
    """bench/floor_list_server.py on a free port for one segment (its pool holds connections only then)."""
    port = free_port()
    path = tmp / "floor.pickle"
    path.write_bytes(pickle.dumps({**job, "port": port}))
    log = tmp / "floor.log"
    with log.open("wb") as out:
        process = psutil.Popen(
            [sys.executable, str(Path(__file__).with_name("floor_list_server.py")), str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        if not wait_for_port("127.0.0.1", port, 30):
            raise SystemExit(log.read_text())
        yield port, ProcessGroup([process])
    finally:
        process.terminate()
        process.wait(20)


class ProcessGroup:
    """The replicas of one service, measured as one: CPU times summed, py-spy on the first."""

    def __init__(self, members: list[psutil.Popen]) -> None:
        self.members = members
        self.pid = members[0].pid

    def cpu_times(self) -> Any:
        times = [member.cpu_times() for member in self.members]
        return SimpleNamespace(user=sum(t.user for t in times), system=sum(t.system for t in times))


def wait_for_listen(process: psutil.Popen, port: int, seconds: float) -> bool:
    """Whether `process` listens on `port` within `seconds` (the port is open already: another replica's)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
            return True
        time.sleep(0.1)  # polling another process's sockets from a script (no event to wait on)
    return False


def report(results: list[Result]) -> None:
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}; every segment:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms | load generator CPU | service CPU |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        server = f"{r.server_cpu:.2f}" if r.server_cpu is not None else "—"
        print(
            f"| {r.name} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.loadgen_cpu:.2f} | {server} |"
        )
    print("\nmedians over the rounds:")
    print("| path | concurrency | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for key in sorted({(r.name, r.concurrency) for r in results}, key=lambda k: (k[1], k[0])):
        rows = [r for r in results if (r.name, r.concurrency) == key]
        m = {
            "rps": statistics.median(r.rps for r in rows),
            "p50": statistics.median(r.p50_ms for r in rows),
            "p99": statistics.median(r.p99_ms for r in rows),
        }
        medians[key] = m
        print(f"| {key[0]} | {key[1]} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} |")
    for c in sorted({r.concurrency for r in results}):
        listed, created, raw_created = medians[(LIST, c)], medians[(CREATE, c)], medians[(RAW_CREATE, c)]
        print(
            f"\nconcurrency {c}: ListItems p99 {listed['p99']:.2f} ms (target < 25 ms; the floor's "
            f"{medians[(FLOOR, c)]['p99']:.2f} ms); CreateItem "
            f"{created['rps'] / raw_created['rps']:.0%} of the raw transaction's throughput (target >= 40%)"
        )


if __name__ == "__main__":
    main()
