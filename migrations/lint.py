"""Lint the SQL of every revision with squawk (PyPI `squawk-cli`) for lock-unsafe operations.

For each revision, Alembic's offline mode (`--sql`) renders what a migration session would run for
its upgrade (`previous:revision`) and its downgrade (`revision:previous`), session statements
included (advisory lock, `SET ROLE`, `lock_timeout`, `statement_timeout`), one file per revision and
direction; squawk checks them all with the project's `.squawk.toml`.

Exceptions, narrowest first:
- one statement: the revision prefixes it with `migrations.online.squawk_ignore(rules, reason, sql)`;
- downgrades: `DOWNGRADE_IGNORED_RULES`, the rules about removing things (a downgrade removes what its
  upgrade added, by design); lock rules still apply to downgrades;
- Alembic's own version table, created with the first revision (a varchar column);
- `GRANDFATHERED`: findings in revisions written before the lint existed, already applied, which are
  not edited after the fact; each with the reason it was harmless when it ran.
Rules that never apply to this project are excluded in `.squawk.toml`, each with its reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory

from migrations import runner

REPO_ROOT = runner.SCRIPT_LOCATION.parent
SQUAWK_CONFIG = REPO_ROOT / ".squawk.toml"
Direction = Literal["upgrade", "downgrade"]
DIRECTIONS: tuple[Direction, ...] = ("upgrade", "downgrade")

DOWNGRADE_IGNORED_RULES: Mapping[str, str] = {
    "ban-drop-table": "a downgrade drops the tables its upgrade created",
    "ban-drop-schema": "a downgrade drops the schema its upgrade created",
    "ban-drop-column": "a downgrade drops the columns its upgrade added",
    "ban-drop-constraint": "a downgrade drops the constraints its upgrade added",
    "ban-drop-not-null": "a downgrade relaxes the NOT NULL its upgrade set",
    "ban-drop-function": "a downgrade drops the functions its upgrade created",
}

GRANDFATHERED: Mapping[tuple[str, Direction], Mapping[str, str]] = {
    ("0002_tenancy_memberships", "upgrade"): {
        "constraint-missing-not-valid": "the CHECK on tenancy.workspaces was added while that table was small",
        "require-concurrent-index-deletion": "ix_workspaces_creator_create_time was dropped on the same small table",
    },
    ("0002_tenancy_memberships", "downgrade"): {
        "require-concurrent-index-creation": "recreates ix_workspaces_creator_create_time on the small workspaces table",
    },
}


class LintError(RuntimeError):
    """The lint could not run (squawk missing, SQL not renderable, squawk output unreadable)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One squawk violation in the SQL of a revision."""

    line: int
    rule: str
    message: str
    help: str = ""

    def __str__(self) -> str:
        advice = f" ({self.help})" if self.help else ""
        return f"line {self.line}: {self.rule}: {self.message}{advice}"


@dataclass(frozen=True, slots=True)
class RevisionLint:
    """The lint of one revision in one direction."""

    revision: str
    direction: Direction
    sql: str
    findings: list[Finding] = field(default_factory=list)
    ignored: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass(frozen=True, slots=True)
class LintReport:
    """The lint of every revision, oldest first, upgrade before downgrade."""

    results: list[RevisionLint]

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def failed(self) -> list[RevisionLint]:
        return [result for result in self.results if not result.ok]


def squawk_executable() -> str:
    """The squawk binary of this virtualenv (`pip install squawk-cli`), else the one on PATH."""
    found = shutil.which("squawk", path=str(Path(sys.executable).parent)) or shutil.which("squawk")
    if found is None:
        raise LintError("squawk is not installed: `.venv/bin/pip install squawk-cli` (part of `make install`)")
    return found


def _config(versions: Path | None) -> Config:
    config = runner.alembic_config()
    if versions is not None:
        config.set_main_option("version_locations", str(versions))
    return config


def revisions(versions: Path | None = None) -> list[Script]:
    """The revisions, oldest first (a single line of history; Tessera has no branches)."""
    script = ScriptDirectory.from_config(_config(versions))
    return list(reversed(list(script.walk_revisions())))


def revision_sql(revision: Script, direction: Direction, *, versions: Path | None = None) -> str:
    """What a migration session runs to apply (or revert) this one revision, rendered offline."""
    config = _config(versions)
    buffer = StringIO()
    config.output_buffer = buffer
    previous = revision.down_revision
    if isinstance(previous, tuple | list):
        raise LintError(f"revision {revision.revision} merges branches; the lint handles a single line")
    try:
        if direction == "upgrade":
            command.upgrade(config, f"{previous}:{revision.revision}" if previous else revision.revision, sql=True)
        else:
            command.downgrade(config, f"{revision.revision}:{previous or 'base'}", sql=True)
    except Exception as exc:  # a revision that cannot render offline is a lint failure with its reason
        raise LintError(f"cannot render the {direction} SQL of {revision.revision}: {exc}") from exc
    return buffer.getvalue()


def _ignored(
    revision: str, direction: Direction, grandfathered: Mapping[tuple[str, Direction], Mapping[str, str]]
) -> dict[str, str]:
    ignored = dict(DOWNGRADE_IGNORED_RULES) if direction == "downgrade" else {}
    ignored.update(grandfathered.get((revision, direction), {}))
    return ignored


# Alembic creates its version table in the first revision's run; its varchar column is not ours to choose.
_VERSION_TABLE_COLUMN = "    version_num VARCHAR(32) NOT NULL"
_VERSION_TABLE_IGNORE = "    -- squawk-ignore prefer-text-field -- Alembic's own version table\n"


def _for_squawk(sql: str, ignored: Mapping[str, str]) -> str:
    if f"CREATE TABLE {runner.META_SCHEMA}.{runner.VERSION_TABLE} (" in sql:
        sql = sql.replace(_VERSION_TABLE_COLUMN, _VERSION_TABLE_IGNORE + _VERSION_TABLE_COLUMN, 1)
    if not ignored:
        return sql
    return f"-- squawk-ignore-file {','.join(sorted(ignored))}\n{sql}"


def lint(
    *,
    versions: Path | None = None,
    config: Path = SQUAWK_CONFIG,
    sql_dir: Path | None = None,
    squawk: str | None = None,
    grandfathered: Mapping[tuple[str, Direction], Mapping[str, str]] = GRANDFATHERED,
) -> LintReport:
    """Render every revision's upgrade and downgrade SQL and lint it with squawk.

    `versions` lints another directory of revisions (with this project's env.py); `sql_dir` keeps the
    rendered files there (default: a temporary directory, removed afterwards).
    """
    if not config.is_file():
        raise LintError(f"squawk configuration {config} not found")
    binary = squawk or squawk_executable()
    pending: list[tuple[str, RevisionLint]] = []
    for index, revision in enumerate(revisions(versions), start=1):
        for direction in DIRECTIONS:
            ignored = _ignored(revision.revision, direction, grandfathered)
            sql = revision_sql(revision, direction, versions=versions)
            name = f"{index:03d}_{revision.revision}.{direction}.sql"
            pending.append((name, RevisionLint(revision.revision, direction, _for_squawk(sql, ignored), [], ignored)))

    with tempfile.TemporaryDirectory(prefix="tessera-squawk-") as tmp:
        directory = sql_dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for name, result in pending:
            (directory / name).write_text(result.sql)
        findings = _run_squawk(binary, config, directory, [name for name, _ in pending])

    return LintReport(
        [
            RevisionLint(result.revision, result.direction, result.sql, findings.get(name, []), result.ignored)
            for name, result in pending
        ]
    )


def _run_squawk(binary: str, config: Path, directory: Path, names: list[str]) -> dict[str, list[Finding]]:
    proc = subprocess.run(
        [binary, "--config", str(config), "--reporter", "json", *names],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        violations = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as exc:
        raise LintError(f"squawk exited {proc.returncode} without a JSON report: {proc.stderr or proc.stdout}") from exc
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not violations):
        raise LintError(f"squawk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    found: dict[str, list[Finding]] = {}
    for violation in violations:
        finding = Finding(
            line=int(violation.get("line", 0)) + 1,  # squawk's JSON lines are 0-based
            rule=str(violation.get("rule_name", "?")),
            message=str(violation.get("message", "")),
            help=str(violation.get("help") or ""),
        )
        found.setdefault(Path(str(violation.get("file", ""))).name, []).append(finding)
    return found
