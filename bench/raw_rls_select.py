"""Raw asyncpg baseline for bench_get_workspace.py: the RLS transaction GetWorkspace has to run.

Run by the benchmark in its own process: `python bench/raw_rls_select.py URL WORKSPACE_ID CONCURRENCY
SECONDS`; prints one JSON line (requests, seconds, p50/p99/mean ms, CPU cores used). The workspace is
visible through its tenant setting (the subject is an arbitrary user, as RLS only needs the tenant).
"""

import asyncio
import json
import resource
import sys
import time
import uuid

import asyncpg

SET_CONTEXT = "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', $2, true)"
SELECT = "SELECT id, display_name, state, creator, create_time, update_time FROM tenancy.workspaces WHERE id = $1"


async def main(url: str, workspace: str, concurrency: int, seconds: float) -> None:
    async def no_reset(conn: asyncpg.Connection) -> None:
        """Every checkout ends its own transaction: skip asyncpg's reset round trip (the fast baseline)."""

    pool = await asyncpg.create_pool(
        url, min_size=concurrency, max_size=concurrency, reset=no_reset, server_settings={"jit": "off"}
    )
    ws_id = uuid.UUID(workspace)
    latencies: list[float] = []

    async def one() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(SET_CONTEXT, workspace, str(uuid.uuid4()))
            row = await conn.fetchrow(SELECT, ws_id)
            assert row is not None, "workspace not visible: RLS context wrong"

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
    url_arg, ws_arg, conc_arg, secs_arg = sys.argv[1:5]
    asyncio.run(main(url_arg, ws_arg, int(conc_arg), float(secs_arg)))
