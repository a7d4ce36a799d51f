"""Contract toolchain evidence for gate S01: buf lint/format, fresh gen/, breaking checks, protovalidate.

Every check runs on the real contracts or on a copy of them in tmp_path; the real proto/ and gen/ are
never written. No database or message broker is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import protovalidate
import pytest
from typer.testing import CliRunner

from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2
from tessera_cli import proto as toolchain
from tessera_cli.commands import proto as proto_commands
from tessera_cli.main import app

pytestmark = pytest.mark.gate("S01")

# Edits that break the released contracts; each must match the source exactly once.
DELETE_FIELD = ("  string creator = 4 [(google.api.field_behavior) = OUTPUT_ONLY];\n", "")
RENUMBER_FIELD = ("  string display_name = 2 [", "  string display_name = 99 [")
WORKSPACE_PROTO = "tessera/tenancy/v1/tenancy.proto"


def edit(path: Path, change: tuple[str, str]) -> None:
    old, new = change
    text = path.read_text()
    assert text.count(old) == 1, f"{path} no longer contains {old!r}; update this test's edit"
    path.write_text(text.replace(old, new))


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A scratch copy of proto/ to break on purpose."""
    return Path(shutil.copytree(toolchain.PROTO_DIR, tmp_path / "proto"))


class TestLintAndFormat:
    def test_buf_lint_is_clean(self) -> None:
        result = toolchain.lint()
        assert result.ok, result.output

    def test_buf_format_is_clean(self) -> None:
        result = toolchain.format_check()
        assert result.ok, result.output

    def test_format_check_fails_on_badly_formatted_copy(self, proto_copy: Path) -> None:
        edit(proto_copy / WORKSPACE_PROTO, ("message Workspace {", "message   Workspace{"))
        result = toolchain.format_check(proto_copy)
        assert not result.ok
        assert "tenancy.proto" in result.output


class TestGeneratedCode:
    def test_gen_is_fresh(self) -> None:
        assert toolchain.generated_diff() == [], "gen/ is stale: run `tessera proto gen`"

    def test_stale_gen_lists_each_differing_file(self, tmp_path: Path) -> None:
        stale = Path(shutil.copytree(toolchain.GEN_DIR, tmp_path / "gen"))
        (stale / "tessera/tenancy/v1/tenancy_pb2.py").write_text("# edited by hand\n")
        (stale / "tessera/common/v1/paging_pb2.pyi").unlink()
        (stale / "tessera/leftover_pb2.py").write_text("")

        result = toolchain.check_generated(stale)

        assert not result.ok
        assert toolchain.generated_diff(stale) == [
            "changed: tessera/tenancy/v1/tenancy_pb2.py",
            "missing: tessera/common/v1/paging_pb2.pyi",
            "extra: tessera/leftover_pb2.py",
        ]
        assert "changed: tessera/tenancy/v1/tenancy_pb2.py" in result.output


class TestBreakingAgainstBaseline:
    def test_unchanged_copy_is_compatible(self, proto_copy: Path) -> None:
        result = toolchain.breaking_against_image(toolchain.BASELINE_IMAGE, proto_copy)
        assert result.ok, result.output

    def test_deleted_field_is_breaking(self, proto_copy: Path) -> None:
        edit(proto_copy / WORKSPACE_PROTO, DELETE_FIELD)
        result = toolchain.breaking_against_image(toolchain.BASELINE_IMAGE, proto_copy)
        assert not result.ok
        assert '"creator"' in result.output
        assert "deleted" in result.output

    def test_renumbered_field_is_breaking(self, proto_copy: Path) -> None:
        edit(proto_copy / WORKSPACE_PROTO, RENUMBER_FIELD)
        result = toolchain.breaking_against_image(toolchain.BASELINE_IMAGE, proto_copy)
        assert not result.ok
        assert '"display_name"' in result.output


GIT_IDENTITY = ("-c", "user.name=Tessera Tests", "-c", "user.email=tests@tessera.invalid", "-c", "commit.gpgsign=false")


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", *GIT_IDENTITY, *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def contract_repo(tmp_path: Path) -> Path:
    """A scratch git repository whose one commit holds a copy of proto/."""
    repo = tmp_path / "repo"
    shutil.copytree(toolchain.PROTO_DIR, repo / "proto")
    git(repo, "init", "-q")
    git(repo, "add", "proto")
    git(repo, "commit", "-q", "-m", "contracts v1")
    return repo


class TestBreakingAgainstGitRef:
    def test_clean_tree_compares_with_previous_commit(self, contract_repo: Path) -> None:
        assert toolchain.default_against_ref(contract_repo) == "HEAD~1"

    def test_unchanged_tree_is_compatible_with_head(self, contract_repo: Path) -> None:
        result = toolchain.breaking_against_ref("HEAD", contract_repo)
        assert result.ok, result.output
        assert "nothing to compare" not in result.output

    def test_uncommitted_deleted_field_breaks_against_head(self, contract_repo: Path) -> None:
        edit(contract_repo / "proto" / WORKSPACE_PROTO, DELETE_FIELD)
        assert toolchain.default_against_ref(contract_repo) == "HEAD"
        result = toolchain.breaking_against_ref("HEAD", contract_repo)
        assert not result.ok
        assert '"creator"' in result.output

    def test_committed_renumbered_field_breaks_against_previous_commit(self, contract_repo: Path) -> None:
        edit(contract_repo / "proto" / WORKSPACE_PROTO, RENUMBER_FIELD)
        git(contract_repo, "commit", "-q", "-am", "renumber display_name")
        result = toolchain.breaking_against_ref(toolchain.default_against_ref(contract_repo), contract_repo)
        assert not result.ok
        assert '"display_name"' in result.output

    def test_missing_ref_has_nothing_to_compare(self, contract_repo: Path) -> None:
        result = toolchain.breaking_against_ref("HEAD~3", contract_repo)
        assert result.ok
        assert "nothing to compare" in result.output


def field_paths(message: object) -> dict[str, str]:
    """Violations of a message as {field path: rule id}."""
    return {
        ".".join(element.field_name for element in violation.proto.field.elements): violation.proto.rule_id
        for violation in protovalidate.collect_violations(message)
    }


class TestProtovalidate:
    def test_generated_validate_module_exists(self) -> None:
        from buf.validate import validate_pb2

        assert validate_pb2.DESCRIPTOR.name == toolchain.VALIDATE_PROTO

    def test_empty_display_name_is_a_field_violation(self) -> None:
        request = tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name=""))
        assert field_paths(request) == {"workspace.display_name": "string.min_len"}

    def test_missing_workspace_is_a_field_violation(self) -> None:
        assert "workspace" in field_paths(tenancy_service_pb2.CreateWorkspaceRequest())

    def test_valid_request_has_no_violations(self) -> None:
        request = tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Acme"))
        assert field_paths(request) == {}


class TestCli:
    def test_lint_prints_a_check_line(self) -> None:
        result = CliRunner().invoke(app, ["proto", "lint"])
        assert result.exit_code == 0, result.output
        assert "✓ buf lint" in result.output

    def test_failed_check_exits_non_zero_with_tool_output(self, monkeypatch: pytest.MonkeyPatch) -> None:
        failure = toolchain.CheckResult("buf lint", False, "first problem\n[second] problem")
        monkeypatch.setattr(proto_commands.toolchain, "lint", lambda: failure)
        result = CliRunner().invoke(app, ["proto", "lint"])
        assert result.exit_code == 1
        assert "✗ buf lint: first problem" in result.output
        assert "[second] problem" in result.output


class TestRelease:
    @pytest.fixture
    def baseline(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """A scratch baseline path standing in for contracts/released.binpb."""
        path = tmp_path / "released.binpb"
        monkeypatch.setattr(toolchain, "BASELINE_IMAGE", path)
        return path

    def test_release_writes_a_baseline_the_contracts_are_compatible_with(self, baseline: Path) -> None:
        first = CliRunner().invoke(app, ["proto", "release"])
        assert first.exit_code == 0, first.output
        assert toolchain.breaking_against_image(baseline).ok

        again = CliRunner().invoke(app, ["proto", "release"])
        assert again.exit_code == 0, again.output
        assert "unchanged" in again.output

    def test_release_refuses_a_breaking_change_unless_allowed(self, baseline: Path, proto_copy: Path) -> None:
        # A baseline with a field that the current contracts no longer have.
        edit(proto_copy / WORKSPACE_PROTO, ("  string creator = 4 [", "  string legacy = 98;\n  string creator = 4 ["))
        toolchain.release_baseline(baseline, proto_copy)
        frozen = baseline.read_bytes()

        refused = CliRunner().invoke(app, ["proto", "release"])
        assert refused.exit_code == 1
        assert '"legacy"' in refused.output
        assert baseline.read_bytes() == frozen

        allowed = CliRunner().invoke(app, ["proto", "release", "--allow-breaking"])
        assert allowed.exit_code == 0, allowed.output
        assert baseline.read_bytes() != frozen
