"""Boundary guardrails for gate S01: the import-linter contracts in pyproject.toml.

The real tree must keep every contract, and the same contracts must catch deliberate violations
planted in a scratch package tree (tmp_path), so a contract that silently checks nothing fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gate("S01")

REPO_ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")

# A minimal tree that keeps every contract: each real service package on top of the kit, and the CLI.
SERVICE_PACKAGES = sorted(
    path.parent.name for path in (REPO_ROOT / "services").glob("*/__init__.py") if path.parent.name != "kit"
)
CLEAN_TREE = {
    "services/__init__.py": "",
    "services/kit/__init__.py": "",
    "services/kit/runtime.py": '"""Shared runtime."""\n',
    "tessera_cli/__init__.py": "",
    "gateway/__init__.py": "",
    "gateway/app.py": '"""Gateway."""\n',
    **{f"services/{name}/__init__.py": "" for name in SERVICE_PACKAGES},
    **{f"services/{name}/service.py": "from services.kit import runtime\n" for name in SERVICE_PACKAGES},
}


def importlinter_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return config


def contract_names() -> dict[str, str]:
    return {contract["id"]: contract["name"] for contract in importlinter_config()["contracts"]}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings and lists of strings are valid TOML in JSON syntax


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write an import-linter configuration as a pyproject.toml."""
    lines = ["[tool.importlinter]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.items() if key != "contracts"]
    for contract in config["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in contract.items()]
    path.write_text("\n".join(lines) + "\n")


def lint_imports(cwd: Path, config: Path, *, isolated: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # keep each contract's status on one line
    if isolated:
        # The scratch tree, not the editable install, must provide `services` and `tessera_cli`.
        env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def statuses(output: str) -> dict[str, str]:
    """{contract id: "KEPT" | "BROKEN"} from lint-imports' summary lines."""
    found: dict[str, str] = {}
    for contract_id, name in contract_names().items():
        for status in ("KEPT", "BROKEN"):
            if f"{name} {status}" in output:
                found[contract_id] = status
    return found


def test_project_declares_the_boundary_contracts() -> None:
    config = importlinter_config()
    assert {"services", "tessera_cli"} <= set(config["root_packages"])
    assert set(contract_names()) >= {
        "kit-imports-no-service",
        "services-independent",
        "services-no-tooling",
        "gateway-imports-no-service",
    }


def test_real_tree_keeps_every_contract() -> None:
    proc = lint_imports(REPO_ROOT, REPO_ROOT / "pyproject.toml", isolated=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(statuses(proc.stdout).values()) == {"KEPT"}
    assert len(statuses(proc.stdout)) == len(contract_names())


def plant(root: Path, files: dict[str, str], *, listed_services: tuple[str, ...] = ()) -> Path:
    """Write a package tree and the project's contracts (with extra services listed) under root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    config = importlinter_config()
    for contract in config["contracts"]:
        if contract["id"] == "services-independent" and listed_services:
            contract["layers"][0] = " | ".join([contract["layers"][0], *listed_services])
    config_path = root / "pyproject.toml"
    write_config(config_path, config)
    return config_path


def test_clean_fixture_keeps_every_contract(tmp_path: Path) -> None:
    config = plant(tmp_path, CLEAN_TREE)
    proc = lint_imports(tmp_path, config, isolated=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("violation", "listed_services", "broken"),
    [
        pytest.param(
            {"services/kit/bad.py": "import services.tenancy\n"},
            (),
            {"kit-imports-no-service", "services-independent"},
            id="kit-imports-a-service",
        ),
        pytest.param(
            {"services/kit/bad.py": "from services.tenancy import service\n"},
            (),
            {"kit-imports-no-service", "services-independent"},
            id="kit-imports-a-service-module",
        ),
        pytest.param(
            {"services/billing/__init__.py": "", "services/billing/service.py": "import services.tenancy.service\n"},
            ("billing",),
            {"services-independent"},
            id="service-imports-another-service",
        ),
        pytest.param(
            {"services/billing/__init__.py": ""},
            (),
            {"services-independent"},
            id="new-service-not-listed-in-contract",
        ),
        pytest.param(
            {"services/tenancy/bad.py": "from tessera_cli import main\n", "tessera_cli/main.py": ""},
            (),
            {"services-no-tooling"},
            id="service-imports-the-cli",
        ),
        pytest.param(
            {"services/kit/bad.py": "import migrations\n"},
            (),
            {"services-no-tooling"},
            id="kit-imports-migrations",
        ),
        pytest.param(
            {"gateway/bad.py": "from services.tenancy import service\n"},
            (),
            {"gateway-imports-no-service"},
            id="gateway-imports-a-service",
        ),
        pytest.param(
            {"gateway/bad.py": "from services.kit import runtime\n"},
            (),
            {"gateway-imports-no-service"},
            id="gateway-imports-the-kit",
        ),
        pytest.param(
            {"services/tenancy/bad.py": "from gateway import app\n"},
            (),
            {"services-no-tooling"},
            id="service-imports-the-gateway",
        ),
    ],
)
def test_violation_breaks_the_contract(
    tmp_path: Path, violation: dict[str, str], listed_services: tuple[str, ...], broken: set[str]
) -> None:
    config = plant(tmp_path, {**CLEAN_TREE, **violation}, listed_services=listed_services)

    proc = lint_imports(tmp_path, config, isolated=True)

    assert proc.returncode != 0, proc.stdout + proc.stderr
    found = statuses(proc.stdout)
    assert {contract_id for contract_id, status in found.items() if status == "BROKEN"} == broken, proc.stdout
    assert len(found) == len(contract_names()), proc.stdout
