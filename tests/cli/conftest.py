"""Helpers for running the `tessera` CLI as a user would: a subprocess with a controlled environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESSERA = str(Path(sys.executable).parent / "tessera")

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment without any TESSERA_* variable, whose TESSERA_HOME is empty (no running stack)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env["TESSERA_HOME"] = str(tmp_path / "home")
    env["COLUMNS"] = "400"  # Rich tables: one line per row, so assertions can read them
    return env


def table_rows(output: str) -> list[list[str]]:
    """The body rows of the Rich tables in output, as lists of stripped cells."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in output.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture
def run_cli(cli_env: dict[str, str]) -> RunCli:
    """Run `tessera <args>` with cli_env plus extra variables; returns the completed process (text)."""

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TESSERA, *args], env=cli_env | extra_env, capture_output=True, text=True, timeout=120)

    return run
