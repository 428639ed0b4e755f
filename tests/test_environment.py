"""environment.yml (the GPU nodes' conda environment) parses, uses no dead channel, pins the torch
the GPU results were measured with, and names everything pyproject.toml needs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_what_pyproject_needs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "lmcore"
    assert env["channels"] == ["conda-forge"]  # the `pytorch` channel stopped at 2.5
    deps = env["dependencies"]
    conda = {_name(d.split("=")[0]) for d in deps if isinstance(d, str)}
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    pip_names = {_name(d) for d in pip if not d.startswith("-")}
    assert "python=3.12" in deps and "torch==2.11.0" in pip
    assert "--extra-index-url https://download.pytorch.org/whl/cu130" in pip and "-e ." in pip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]}
    needed |= {_name(r) for extra in ("dev", "lab") for r in project["optional-dependencies"][extra]}
    missing = needed - conda - pip_names
    assert not missing, f"environment.yml lacks {sorted(missing)}"
    assert "jupyterlab" in pip_names
