"""The installable package: a console script for every entry point, every third-party import declared, and
`pip install .` (not editable) into a clean venv giving a package that runs from another folder."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import typing
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCRIPTS: dict[str, str] = PROJECT["scripts"]
# What `pip install` of a copy of the repository needs; anything else it reads must be added here and to the copy.
BUILD_INPUTS = ("pyproject.toml", "README.md", "dmgr", "conf", "checkpoints")


def _modules() -> dict[str, Path]:
    """Every module of dmgr/ by dotted name (a package by its own name)."""
    return {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
            for path in (REPO / "dmgr").rglob("*.py")}


# Imports every module of the installed package (but the __main__ modules, which run their tool) and prints the names.
IMPORT_ALL = """
import importlib, json, pkgutil, dmgr
names = ["dmgr"] + [m.name for m in pkgutil.walk_packages(dmgr.__path__, "dmgr.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps(names))
"""


def _distribution(requirement: str) -> str:
    """`PyYAML>=6` -> `pyyaml` (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_every_runnable_module_is_a_console_script():
    runnable = {name for name, path in _modules().items() if 'if __name__ == "__main__":' in path.read_text()}
    targets = {target.partition(":")[0] for target in SCRIPTS.values()}
    assert runnable == targets, f"modules run with python -m but not installed: {sorted(runnable - targets)}; " \
                                f"scripts naming no runnable module: {sorted(targets - runnable)}"
    assert all(name.startswith("dmgr-") for name in SCRIPTS)
    for target in SCRIPTS.values():
        module, _, function = target.partition(":")
        main = getattr(importlib.import_module(module), function)
        if Path(main.__code__.co_filename).parts[-2:] != ("hydra", "main.py"):  # @hydra.main returns None
            # A console script exits with what its function returns: None (0) or a status.
            assert typing.get_type_hints(main)["return"] in (type(None), int), target


def test_every_package_is_installed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dmgr").rglob("__init__.py")}
    data = {name: REPO / folder for name, folder in setuptools["package-dir"].items()}
    assert set(setuptools["packages"]) == packages | set(data)
    assert {folder.name for folder in data.values()} == {"conf", "checkpoints"}
    assert all(folder.is_dir() for folder in data.values())


def test_every_third_party_import_is_declared():
    """Imports at module level need a dependency; those of an optional extra may only be made inside a function
    (so the package imports without them)."""
    required = {_distribution(r) for r in PROJECT["dependencies"]}
    extras = {_distribution(r) for group in PROJECT["optional-dependencies"].values() for r in group}
    distributions = importlib.metadata.packages_distributions()
    undeclared, eager = [], []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.partition(".")[0]]
            else:
                continue
            for root in roots:
                if root in sys.stdlib_module_names or root in ("dmgr", "__future__"):
                    continue
                dists = {_distribution(d) for d in distributions.get(root, [root])}
                if dists & required:
                    continue
                if dists & extras and id(node) not in top_level:
                    continue
                (eager if dists & extras else undeclared).append(f"{name}: {root}")
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    assert not eager, f"an optional extra imported at module level: {eager}"


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_pip_install_runs_from_another_folder(tmp_path):
    """A copy of the repository installed (not editable) into a new venv: the pinned torch first, as `make venv`
    does, then the package with its dependencies. From a folder outside both, every console script prints its
    help, and a short real run on the packaged configs and demo checkpoints writes under that folder."""
    started = time.monotonic()
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(item, source / name)
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    torch_version = importlib.metadata.version("torch").partition("+")[0]
    _run([python, "-m", "pip", "install", "-q", "--no-compile", f"torch=={torch_version}"], tmp_path, 600)
    _run([python, "-m", "pip", "install", "-q", source], tmp_path, 600)
    installed = time.monotonic()

    where = json.loads(_run([python, "-c", "import json, dmgr; print(json.dumps([dmgr.__file__, dmgr.CONF_DIR]))"],
                            work).stdout)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert [Path(p) for p in where] == [site / "dmgr" / "__init__.py", site / "dmgr" / "conf"]
    imported = json.loads(_run([python, "-c", IMPORT_ALL], work).stdout)
    assert sorted(imported) == sorted(name for name in _modules() if not name.endswith("__main__"))

    helps = {name: subprocess.Popen([bin_dir / name, "--help"], cwd=work, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in SCRIPTS}
    for name, proc in helps.items():
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{text[-3000:]}"
        # Usage lines (and Hydra's app help) name the command that was run.
        assert f"{name} is powered by Hydra" in text or f"usage: {name} " in text, f"{name} --help:\n{text[-3000:]}"
    helped = time.monotonic()

    # The demo's panels, two of them, by the installed renderer (the default input renders 256 on first use).
    _run([bin_dir / "dmgr-data-export", "--out", "boards", "--size", "64", "--panel", "160x112", "--boards", "2",
          "--patches-per-class", "0", "--test", "0", "--roi-slack", "2", "--quiet"], work)
    _run([bin_dir / "dmgr-synth", "seeds=0-1", "samples_per_shard=2", "screen.enabled=false",
          "dataset.images=boards/backgrounds.jsonl", "out_dir=outputs/run"], work)
    run = work / "outputs" / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    for which in ("global", "local"):
        shipped = hashlib.sha256((REPO / "checkpoints" / "demo" / f"{which}.safetensors").read_bytes()).hexdigest()
        assert manifest["checkpoints"][which] == shipped
    with tarfile.open(run / "shards" / "dmgr-000000.tar") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"{seed:08d}.{member}" for seed in (0, 1) for member in ("png", "mask.png", "json"))
    _run([bin_dir / "dmgr-export", "coco", run, "coco"], work)
    assert list((work / "coco").rglob("*.json"))
    print(f"\npackaging: install {installed - started:.0f} s, every module imported and {len(SCRIPTS)} --help "
          f"{helped - installed:.0f} s, render + synth + export {time.monotonic() - helped:.0f} s")
