"""Raw asyncpg baselines for bench_workflow.py, run in their own process: `python bench/raw_workflow.py JOB`.

JOB is a pickle written by the benchmark: {"kind": "list" | "create", "url", "tenant", "concurrency",
"seconds", ...}. `list` runs the service's own compiled ListItems SQL ("sql", positional "params");
`create` inserts an item, its CREATED activity row and an outbox row carrying "envelope". Each runs in a
transaction with the tenant set, as the workflow login role (forced RLS applies), with the service's
connection settings (custom plans: see services/workflow/main.py). Prints one JSON line.
"""

import asyncio
import json
import pickle
import resource
import sys
import time
import uuid
from typing import Any

import asyncpg

SET_CONTEXT = "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', $2, true)"
INSERT_ITEM = (
    "INSERT INTO workflow.items (tenant_id, id, project_id, title, description, status, status_category, priority, "
    "labels, creator, updater) VALUES ($1, $2, $3, 'Benchmark item', 'created by bench_workflow.py', $4, $5, 0, "
    "ARRAY['bench'], 'users/bench', 'users/bench')"
)
INSERT_ACTIVITY = (
    "INSERT INTO workflow.activities (tenant_id, id, item_id, project_id, kind, actor) "
    "VALUES ($1, $2, $3, $4, 'CREATED', 'users/bench')"
)
INSERT_OUTBOX = (
    "INSERT INTO workflow.outbox (id, nats_subject, envelope) VALUES ($1, 'tessera.workflow.item_created', $2)"
)


def _uuid7() -> uuid.UUID:
    from services.kit.ids import uuid7

    return uuid7()


async def main(job: dict[str, Any]) -> None:
    concurrency, seconds, tenant = job["concurrency"], job["seconds"], job["tenant"]
    tenant_id = uuid.UUID(tenant)

    async def no_reset(conn: asyncpg.Connection) -> None:
        """Every checkout ends its own transaction: skip asyncpg's reset round trip (the fast baseline)."""

    pool = await asyncpg.create_pool(
        job["url"],
        min_size=concurrency,
        max_size=concurrency,
        reset=no_reset,
        server_settings={"jit": "off", "plan_cache_mode": "force_custom_plan"},
    )
    if job["kind"] == "create":
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(SET_CONTEXT, tenant, str(uuid.uuid4()))
            row = await conn.fetchrow(
                "SELECT workflow->>'initial' AS initial, workflow FROM workflow.projects WHERE id = $1", job["project"]
            )
        spec = json.loads(row["workflow"]) if isinstance(row["workflow"], str) else row["workflow"]
        initial = spec.get("initial") or spec.get("initial_state")
        category = next(state["category"] for state in spec["states"] if state["id"] == initial)

    async def one() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(SET_CONTEXT, tenant, str(uuid.uuid4()))
            if job["kind"] == "list":
                rows = await conn.fetch(job["sql"], *job["params"])
                assert len(rows) == 51, f"expected a full page, got {len(rows)}"
            else:
                item = _uuid7()
                await conn.execute(INSERT_ITEM, tenant_id, item, job["project"], initial, category)
                await conn.execute(INSERT_ACTIVITY, tenant_id, _uuid7(), item, job["project"])
                await conn.execute(INSERT_OUTBOX, _uuid7(), job["envelope"])

    latencies: list[float] = []

    async def worker(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            await one()
            if record:
                latencies.append((time.perf_counter() - started) * 1000)

    warm_until = time.perf_counter() + 2
    await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t0 + seconds, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / elapsed
    latencies.sort()
    await pool.close()
    print(
        json.dumps(
            {
                "n": len(latencies),
                "seconds": elapsed,
                "p50": latencies[len(latencies) // 2],
                "p99": latencies[int(len(latencies) * 0.99)],
                "mean": sum(latencies) / len(latencies),
                "cpu": cpu,
            }
        )
    )


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        asyncio.run(main(pickle.loads(handle.read())))  # our own benchmark's file
