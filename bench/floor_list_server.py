"""The floor of a gRPC ListItems on this machine, for bench_workflow.py: `python bench/floor_list_server.py JOB`.

A grpc.aio server (uvloop, as the services run) whose ListItems does nothing but what no Python gRPC
service doing the same SQL can skip: take an asyncpg connection from a pool, BEGIN with the tenant
context (one round trip, as the kit's unit of work does), run the service's page statement, COMMIT,
and answer with a response serialized once at start. No authentication, validation, SQLAlchemy pool,
page token or rendering. What this process reaches bounds what the workflow service can reach on the
same machine, with the same SQL and the same client (h2load).

JOB is a pickle written by the benchmark: {"url", "tenant", "sql", "params", "response" (bytes),
"port", "pool_size"}. Prints "ready" once it listens.
"""

import pickle
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop

METHOD = "/tessera.workflow.v1.WorkflowService/ListItems"


async def serve(job: dict[str, Any]) -> None:
    async def no_reset(conn: asyncpg.Connection) -> None:
        """Every checkout ends its own transaction: skip asyncpg's reset round trip."""

    pool = await asyncpg.create_pool(
        job["url"],
        min_size=job["pool_size"],
        max_size=job["pool_size"],
        reset=no_reset,
        server_settings={"jit": "off", "plan_cache_mode": "force_custom_plan"},
    )
    begin = (
        f"BEGIN; SELECT set_config('tessera.tenant_id', '{job['tenant']}', true), "
        "set_config('tessera.subject', '', true)"
    )
    sql, params = job["sql"], job["params"]
    response: bytes = job["response"]

    async def list_items(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with pool.acquire() as conn:
            await conn.execute(begin)
            rows = await conn.fetch(sql, *params)
            await conn.execute("COMMIT")
        if len(rows) != 51:
            await context.abort(grpc.StatusCode.INTERNAL, f"expected a full page, got {len(rows)} rows")
        return response  # bytes out: the handler has no response serializer

    class Handler(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if handler_call_details.method == METHOD:
                return grpc.unary_unary_rpc_method_handler(list_items)  # bytes in and out
            return None

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(f"127.0.0.1:{job['port']}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    job = pickle.loads(Path(sys.argv[1]).read_bytes())  # written by bench_workflow.py, same user
    uvloop.run(serve(job))


if __name__ == "__main__":
    main()
