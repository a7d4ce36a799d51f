"""`tessera events dlq list|replay`: inspect and replay dead letters (services/kit/dlq.py).

NATS is `--nats-url`, else TESSERA_NATS_URL, else the running local stack's (TESSERA_HOME/stack.json).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tessera_cli.commands._common import HomeOption, fail, settings_or_exit
from tessera_cli.stack import NatsUnreachable, StackError, connect_nats, resolve_nats_url

if TYPE_CHECKING:  # imported lazily at run time: the kit's event modules pull in SQLAlchemy and nats
    from nats.js import JetStreamContext

    from services.kit.dlq import DeadLetter

app = typer.Typer(name="events", help="Events on NATS JetStream.", no_args_is_help=True)
dlq_app = typer.Typer(name="dlq", help="Dead letters: messages a consumer gave up on.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

console = Console(highlight=False)
T = TypeVar("T")
CONNECT_TIMEOUT = 10.0

NatsUrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url", help="NATS URL. Default: $TESSERA_NATS_URL, else the running local stack's.", show_default=False
    ),
]
ConsumerOption = Annotated[
    str | None, typer.Option("--consumer", "-c", help="Only the dead letters of this consumer.", show_default=False)
]
HomeArg = Annotated[Path | None, HomeOption]


def _with_jetstream(home: Path | None, nats_url: str | None, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    settings = settings_or_exit(console, home=home)
    try:
        url = resolve_nats_url(settings, explicit=nats_url).url
    except StackError as exc:
        raise fail(console, str(exc)) from None

    async def run() -> T:
        # Not services.kit.broker.Broker: it retries an unreachable server forever, a command must fail fast.
        try:
            nc = await connect_nats(url, name="tessera-cli", timeout=CONNECT_TIMEOUT)
        except NatsUnreachable as exc:
            raise fail(console, f"cannot connect to NATS: {exc}") from None
        try:
            return await work(nc.jetstream(timeout=CONNECT_TIMEOUT))
        finally:
            await nc.close()

    return asyncio.run(run())


def _as_json(letter: DeadLetter) -> dict[str, object]:
    return {
        "seq": letter.seq,
        "consumer": letter.consumer,
        "original_subject": letter.original_subject,
        "event_id": letter.event_id,
        "event_type": letter.envelope.type,
        "tenant_id": letter.envelope.tenant_id,
        "attempts": letter.attempts,
        "error": letter.error,
        "failed_at": letter.failed_at.isoformat() if letter.failed_at else None,
    }


@dlq_app.command("list")
def list_(
    consumer: ConsumerOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many, oldest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout instead of a table.")] = False,
    nats_url: NatsUrlOption = None,
    home: HomeArg = None,
) -> None:
    """List dead letters (oldest first) without consuming them."""

    async def work(js: JetStreamContext) -> list[DeadLetter]:
        from services.kit import dlq

        return await dlq.list_dead_letters(js, consumer=consumer, limit=limit)

    letters = _with_jetstream(home, nats_url, work)
    if as_json:
        typer.echo(json.dumps([_as_json(letter) for letter in letters], indent=2))
        return
    scope = f" of consumer {consumer}" if consumer else ""
    if not letters:
        console.print(f"no dead letters{escape(scope)}")
        return
    table = Table(title=f"dead letters{scope} (oldest first)", title_justify="left")
    for column in ("seq", "consumer", "subject", "event id", "attempts", "failed at", "last error"):
        table.add_column(column, overflow="fold", justify="right" if column in ("seq", "attempts") else "left")
    for letter in letters:
        table.add_row(
            str(letter.seq),
            escape(letter.consumer),
            escape(letter.original_subject),
            escape(letter.event_id),
            str(letter.attempts),
            letter.failed_at.isoformat(timespec="seconds") if letter.failed_at else "-",
            escape(letter.error),
        )
    console.print(table)
    if len(letters) == limit:
        console.print(f"[dim]showing the first {limit}; raise --limit to see more[/dim]")


@dlq_app.command("replay")
def replay(
    seqs: Annotated[
        list[int] | None, typer.Argument(help="Sequence numbers from `dlq list`.", show_default=False)
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter (of --consumer, if given).")] = False,
    consumer: ConsumerOption = None,
    nats_url: NatsUrlOption = None,
    home: HomeArg = None,
) -> None:
    """Republish dead letters to their original subject, for their consumer only, and delete them."""
    if bool(seqs) == all_:
        raise fail(console, "give either sequence numbers or --all", code=2)

    if all_:

        async def replay_everything(js: JetStreamContext) -> int:
            from services.kit import dlq

            return await dlq.replay_all(js, consumer=consumer)

        count = _with_jetstream(home, nats_url, replay_everything)
        scope = f" of consumer {consumer}" if consumer else ""
        console.print(f"[green]✓[/green] replayed {count} dead letter{'s' if count != 1 else ''}{escape(scope)}")
        return

    async def replay_each(js: JetStreamContext) -> list[str]:
        from services.kit import dlq

        problems: list[str] = []
        for seq in seqs or []:
            try:
                letter = await dlq.get_dead_letter(js, seq)
                if consumer and letter.consumer != consumer:
                    problems.append(f"{seq}: belongs to consumer {letter.consumer}, not {consumer}; not replayed")
                    continue
                await dlq.replay(js, seq)
            except (dlq.DeadLetterNotFoundError, ValueError) as exc:
                problems.append(f"{seq}: {exc}")
                continue
            console.print(
                f"[green]✓[/green] {seq}: event {escape(letter.event_id)} replayed to "
                f"{escape(letter.original_subject)} for {escape(letter.consumer)}"
            )
        return problems

    problems = _with_jetstream(home, nats_url, replay_each)
    for problem in problems:
        console.print(f"[red]✗[/red] {escape(problem)}")
    if problems:
        raise typer.Exit(1)
