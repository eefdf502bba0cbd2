"""The house as tools see it: every `expertmesh.*` import resolves to a real file for a type
checker (the layout of DESIGN.md, "The house": expertmesh/<folder> -> ../<folder>), and no
folder is importable as a bare top-level name."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "experts", "router", "engine", "cluster", "gateway", "bench", "demo", "proto")


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_is_a_relative_symlink_in_the_package(folder):
    link = ROOT / "expertmesh" / folder
    assert link.is_symlink(), f"expertmesh/{folder} should link to ../{folder}"
    assert Path(link.readlink()) == Path("..") / folder
    assert (link / "__init__.py").is_file()


def test_a_type_checker_resolves_every_import_of_the_package():
    exe = shutil.which("basedpyright")
    if exe is None:
        pytest.skip("basedpyright is not installed (it comes with the [test] extra)")
    # The settings (which folders, import errors only) live in pyproject.toml's [tool.basedpyright].
    proc = subprocess.run([exe, "--outputjson"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    unresolved = [f"{d['file']}: {d['message']}" for d in report["generalDiagnostics"]
                  if d.get("rule") in ("reportMissingImports", "reportAttributeAccessIssue")
                  or "could not be resolved" in d["message"]]
    assert report["summary"]["filesAnalyzed"] > 50
    assert not unresolved, "\n".join(unresolved)


def test_no_folder_is_importable_as_a_bare_name(tmp_path):
    # (another distribution may own a name, as proto-plus owns `proto`: only ours must not appear)
    code = ("import importlib.util, sys; specs = [importlib.util.find_spec(n) for n in sys.argv[2:]]; "
            "print([s.origin for s in specs if s is not None and s.origin and s.origin.startswith(sys.argv[1])])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as an installed package sees it
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *FOLDERS], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
