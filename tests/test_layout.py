"""The package's import direction: the synthesis job may run the evaluation after its shards are written
(`quality.enabled`), so dmgr.synth may import dmgr.eval there and nowhere else; the evaluation reads finished
runs and never imports the synthesis package. Shared pieces live below both (dmgr.models, dmgr.shards, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

from synth_support import ROOT

PACKAGE = ROOT / "dmgr"
# module of dmgr.synth -> the dmgr.eval modules it may import: the post-run quality step and its settings
SYNTH_MAY_IMPORT_EVAL = {
    "dmgr/synth/app.py": {"dmgr.eval.app", "dmgr.eval.classifier"},
    "dmgr/synth/config.py": {"dmgr.eval.classifier"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_evaluation_never_imports_the_synthesis_package():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("dmgr.synth"))
        for path in sorted((PACKAGE / "eval").glob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_synthesis_imports_the_evaluation_only_for_the_post_run_quality_step():
    found = {}
    for path in sorted((PACKAGE / "synth").glob("*.py")):
        evals = {m for m in imported_modules(path) if m.startswith("dmgr.eval")}
        if evals:
            found[str(path.relative_to(ROOT))] = evals
    assert found == SYNTH_MAY_IMPORT_EVAL

