"""`tessera migrate lint`: squawk over the SQL of every revision, clean on the real tree, failing on planted
lock-unsafe revisions (the same idea as the planted import-linter violations in tests/contracts)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from migrations import lint

pytestmark = pytest.mark.gate("S04")

TESSERA = str(Path(sys.executable).parent / "tessera")
REVISIONS_BEFORE_THE_LINT = {"0001", "0002_tenancy_memberships", "0003_identity", "0004_workflow"}

HEADER = """
from alembic import op
from migrations.online import squawk_ignore

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
"""

PLANTED = {
    "p1_things": (
        None,
        """
        def upgrade():
            op.execute("CREATE SCHEMA planted")
            op.execute("CREATE TABLE planted.things (id bigint PRIMARY KEY, x text NOT NULL, n bigint)")

        def downgrade():
            op.execute("DROP TABLE planted.things")
            op.execute("DROP SCHEMA planted")
        """,
    ),
    # Three classic lock hazards on a table that already exists (and has data in production).
    "p2_unsafe": (
        "p1_things",
        """
        def upgrade():
            op.execute("CREATE INDEX ix_things_x ON planted.things (x)")
            op.execute("ALTER TABLE planted.things ADD CONSTRAINT ck_things_x CHECK (x <> '')")
            op.execute("ALTER TABLE planted.things ALTER COLUMN n TYPE numeric")

        def downgrade():
            op.execute("ALTER TABLE planted.things ALTER COLUMN n TYPE bigint")
            op.execute("ALTER TABLE planted.things DROP CONSTRAINT ck_things_x")
            op.execute("DROP INDEX planted.ix_things_x")
        """,
    ),
    # The first cut of 0006: NOT VALID, then VALIDATE in the same transaction (reads blocked meanwhile).
    "p3_validate_in_same_transaction": (
        "p2_unsafe",
        """
        def upgrade():
            op.execute("ALTER TABLE planted.things ADD CONSTRAINT ck_things_n CHECK (n > 0) NOT VALID")
            op.execute("ALTER TABLE planted.things VALIDATE CONSTRAINT ck_things_n")

        def downgrade():
            op.execute("ALTER TABLE planted.things DROP CONSTRAINT ck_things_n")
        """,
    ),
    # The same intentions written lock-safely: passes.
    "p4_safe": (
        "p3_validate_in_same_transaction",
        """
        def upgrade():
            with op.get_context().autocommit_block():
                op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_things_n ON planted.things (n)")
            # Re-runnable: the statements outside a transaction may have run already.
            op.execute(
                squawk_ignore(
                    ["ban-drop-constraint"], "only an earlier run's NOT VALID constraint",
                    "ALTER TABLE planted.things DROP CONSTRAINT IF EXISTS ck_things_big",
                )
            )
            op.execute("ALTER TABLE planted.things ADD CONSTRAINT ck_things_big CHECK (n < 1000000) NOT VALID")
            with op.get_context().autocommit_block():
                op.execute(
                    squawk_ignore(
                        ["prefer-robust-stmts"], "VALIDATE is idempotent",
                        "ALTER TABLE planted.things VALIDATE CONSTRAINT ck_things_big",
                    )
                )

        def downgrade():
            op.execute("ALTER TABLE planted.things DROP CONSTRAINT IF EXISTS ck_things_big")
            with op.get_context().autocommit_block():
                op.execute("DROP INDEX CONCURRENTLY IF EXISTS planted.ix_things_n")
        """,
    ),
}


@pytest.fixture
def planted_versions(tmp_path: Path) -> Path:
    versions = tmp_path / "versions"
    versions.mkdir()
    for revision, (down, body) in PLANTED.items():
        source = HEADER.format(revision=revision, down=down) + textwrap.dedent(body)
        (versions / f"{revision}.py").write_text(source)
    return versions


def rules(report: lint.LintReport, revision: str, direction: str) -> set[str]:
    [result] = [r for r in report.results if (r.revision, r.direction) == (revision, direction)]
    return {finding.rule for finding in result.findings}


def test_every_revision_of_the_project_is_squawk_clean() -> None:
    report = lint.lint()

    assert report.failed == [], "\n".join(f"{r.revision} {r.direction}: {r.findings}" for r in report.failed)
    revisions = [script.revision for script in lint.revisions()]
    assert [(r.revision, r.direction) for r in report.results] == [
        (revision, direction) for revision in revisions for direction in ("upgrade", "downgrade")
    ]
    # What squawk read is what a migration session runs: session settings, then the revision.
    [expand] = [r for r in report.results if (r.revision, r.direction) == ("0005_status_category_expand", "upgrade")]
    assert "SET lock_timeout = '5s'" in expand.sql
    assert "SET statement_timeout = '60s'" in expand.sql
    assert expand.sql.index("COMMIT;") < expand.sql.index("WITH batch AS MATERIALIZED")  # batches outside the DDL


def test_planted_lock_unsafe_revisions_fail_the_lint(planted_versions: Path) -> None:
    report = lint.lint(versions=planted_versions)

    assert not report.ok
    assert {"require-concurrent-index-creation", "constraint-missing-not-valid", "changing-column-type"} <= rules(
        report, "p2_unsafe", "upgrade"
    )
    assert "require-concurrent-index-deletion" in rules(report, "p2_unsafe", "downgrade")
    assert "constraint-missing-not-valid" in rules(report, "p3_validate_in_same_transaction", "upgrade")
    assert {(r.revision, r.direction) for r in report.failed} == {
        ("p2_unsafe", "upgrade"),
        ("p2_unsafe", "downgrade"),
        ("p3_validate_in_same_transaction", "upgrade"),
    }
    assert rules(report, "p4_safe", "upgrade") == set()
    assert rules(report, "p1_things", "upgrade") == set()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env["COLUMNS"] = "400"
    return subprocess.run([TESSERA, *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_lint_prints_each_revision_and_fails_on_planted_findings(planted_versions: Path, tmp_path: Path) -> None:
    clean = run_cli("migrate", "lint")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "✓ 0005_status_category_expand upgrade" in clean.stdout
    assert "revision scripts are squawk-clean" in clean.stdout

    sql_dir = tmp_path / "sql"
    planted = run_cli("migrate", "lint", "--versions", str(planted_versions), "--sql-dir", str(sql_dir))
    assert planted.returncode == 1, planted.stdout + planted.stderr
    assert "✗ p2_unsafe upgrade" in planted.stdout
    assert "require-concurrent-index-creation" in planted.stdout
    assert "✓ p4_safe upgrade" in planted.stdout
    assert "3 of 8 revision scripts have lock-unsafe statements" in planted.stdout
    assert "CREATE INDEX ix_things_x ON planted.things (x);" in (sql_dir / "002_p2_unsafe.upgrade.sql").read_text()


def test_every_grandfathered_exception_is_still_needed_and_only_for_old_revisions() -> None:
    report = lint.lint(grandfathered={})

    found = {(r.revision, r.direction): {f.rule for f in r.findings} for r in report.failed}
    assert found == {key: set(reasons) for key, reasons in lint.GRANDFATHERED.items()}
    assert {revision for revision, _ in lint.GRANDFATHERED} <= REVISIONS_BEFORE_THE_LINT
    assert all(reason for reasons in lint.GRANDFATHERED.values() for reason in reasons.values())


def test_rule_exclusions_are_justified() -> None:
    config_text = lint.SQUAWK_CONFIG.read_text()
    excluded = tomllib.loads(config_text)["excluded_rules"]
    lines = [line.strip() for line in config_text.splitlines()]
    for rule in excluded:
        index = lines.index(f'"{rule}",')
        while lines[index - 1].startswith('"'):  # rules of one group share the comment above them
            index -= 1
        assert lines[index - 1].startswith("#"), f"{rule} is excluded without a comment saying why"
    # Downgrades only skip the rules about removing things; lock rules apply to them too.
    assert all(rule.startswith("ban-drop-") for rule in lint.DOWNGRADE_IGNORED_RULES)
