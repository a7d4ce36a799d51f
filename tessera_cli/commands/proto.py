"""`tessera proto`: lint, format, breaking checks, code generation and baseline release of the contracts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera_cli import proto as toolchain

app = typer.Typer(
    name="proto",
    help="Contracts in proto/: lint, format, breaking-change checks, code generation, baseline release.",
    no_args_is_help=True,
)

console = Console(highlight=False)


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(toolchain.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _report(result: toolchain.CheckResult, *, show_output_on_success: bool = False) -> bool:
    """Print one line per check (✓/✗) and, on failure, the tool's output indented below it."""
    mark = "[green]✓[/green]" if result.ok else "[red]✗[/red]"
    first, _, rest = result.output.partition("\n")
    console.print(f"{mark} {result.name}: ", end="")
    console.print(first, markup=False)
    if rest and (not result.ok or show_output_on_success):
        for line in rest.splitlines():
            console.print(f"    {line}", markup=False)
    return result.ok


def _run_checks(checks: list[Callable[[], toolchain.CheckResult]]) -> None:
    """Run every check (even after a failure, so one run shows everything); exit 1 if any failed."""
    ok = True
    for check in checks:
        try:
            result = check()
        except toolchain.ProtoToolError as exc:
            console.print("[red]✗[/red] ", end="")
            console.print(str(exc), markup=False)
            ok = False
            continue
        ok = _report(result) and ok
    if not ok:
        raise typer.Exit(code=1)


@app.command()
def lint() -> None:
    """Run `buf lint` (STANDARD rules) on the contracts."""
    _run_checks([toolchain.lint])


@app.command("format")
def format_(
    write: Annotated[bool, typer.Option("--write", "-w", help="Rewrite the files instead of checking them.")] = False,
) -> None:
    """Check that the contracts are in `buf format` style; `--write` fixes them in place."""
    _run_checks([toolchain.format_write if write else toolchain.format_check])


@app.command()
def breaking(
    against_ref: Annotated[
        str | None,
        typer.Option(
            "--against-ref",
            help="Git revision to compare with. Default: HEAD if proto/ has uncommitted changes, else HEAD~1.",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        Path,
        typer.Option(help="Released baseline image to compare with."),
    ] = toolchain.BASELINE_IMAGE,
) -> None:
    """Fail on breaking changes against the released baseline image and against a git revision.

    A deliberate breaking change goes into a new package version (tessera.<domain>.v2), never into v1.
    """
    ref = against_ref or toolchain.default_against_ref()

    def against_baseline() -> toolchain.CheckResult:
        if not baseline.exists():
            raise toolchain.ProtoToolError(
                f"buf breaking vs baseline: {_display(baseline)} is missing; create it with `tessera proto release`"
            )
        return toolchain.breaking_against_image(baseline, label=_display(baseline))

    _run_checks([against_baseline, lambda: toolchain.breaking_against_ref(ref)])


@app.command()
def gen(
    check: Annotated[
        bool, typer.Option("--check", help="Do not write: fail if gen/ differs from what proto/ generates.")
    ] = False,
) -> None:
    """Regenerate gen/ (pb2 modules, .pyi stubs, gRPC stubs) from proto/."""
    if check:
        _run_checks([toolchain.check_generated])
        return

    def regenerate() -> toolchain.CheckResult:
        modules = toolchain.generate()
        return toolchain.CheckResult(
            "tessera proto gen", True, f"wrote {len(modules)} modules to {_display(toolchain.GEN_DIR)}"
        )

    _run_checks([regenerate])


@app.command()
def release(
    allow_breaking: Annotated[
        bool,
        typer.Option("--allow-breaking", help="Release even if the contracts break the current baseline."),
    ] = False,
) -> None:
    """Deliberately rewrite the released baseline (contracts/released.binpb) from the current contracts.

    Run it when a contract version ships; commit the new baseline in the same change.
    """
    baseline = toolchain.BASELINE_IMAGE
    checks: list[Callable[[], toolchain.CheckResult]] = [toolchain.lint]
    if baseline.exists() and not allow_breaking:
        checks.append(lambda: toolchain.breaking_against_image(baseline, label=_display(baseline)))
    _run_checks(checks)
    previous = baseline.read_bytes() if baseline.exists() else None

    def write_baseline() -> toolchain.CheckResult:
        toolchain.release_baseline(baseline)
        if previous == baseline.read_bytes():
            return toolchain.CheckResult("release", True, f"{_display(baseline)} unchanged")
        return toolchain.CheckResult("release", True, f"wrote {_display(baseline)}; commit it with the contracts")

    _run_checks([write_baseline])
