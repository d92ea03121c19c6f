"""The evaluation's judge is independent of the quality screen: its own boards (the JUDGE stream, which no other
part reads), its own architecture and its own training code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dmgr.data.export import GLOBAL_OFFSET, LOCAL_OFFSET, STREAM, TEST_OFFSET
from dmgr.eval import classifier, real
from dmgr.eval.classifier import ClassifierSettings, JudgeNet, accuracy, load_or_train, training_patches
from dmgr.eval.fewshot import user_defects
from dmgr.eval.real import JUDGE, USER, VALIDATION
from dmgr.models.classifier import PatchClassifier

ROOT = Path(__file__).resolve().parents[1]
SMALL = ClassifierSettings(per_class=30, validation_per_class=5, steps=500, batch_size=64, width=16, lr=1e-2)


def test_the_judge_trains_on_judge_boards_only(monkeypatch):
    seen = []
    original = real.make_board
    monkeypatch.setattr(real, "make_board", lambda seed, size: seen.append(seed) or original(seed, size))
    training_patches(ClassifierSettings(per_class=5))
    assert seen and all(JUDGE <= s < JUDGE + STREAM for s in seen)
    others = [GLOBAL_OFFSET, LOCAL_OFFSET, TEST_OFFSET, VALIDATION, USER]
    assert all(not o <= s < o + STREAM for s in seen for o in others)
    users = {d.board_seed for d in user_defects(256)}  # the few-defect curve's largest user set
    assert not users & set(seen)


def test_no_other_part_of_the_package_reads_the_judge_stream():
    readers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "dmgr").rglob("*.py")
               if "JUDGE" in {n.id for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Name)}]
    assert sorted(readers) == ["dmgr/eval/classifier.py", "dmgr/eval/real.py"]


def test_the_judge_shares_no_code_with_the_screen_classifier():
    assert not isinstance(JudgeNet(7), PatchClassifier)
    tree = ast.parse(Path(classifier.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "dmgr.models.classifier"
                for a in n.names}
    assert imported <= {"Patches"}  # the data container only: no network, no training loop, no prediction
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dmgr.synth") for n in ast.walk(tree))


@pytest.mark.slow
def test_the_judge_learns_its_classes_and_is_cached(tmp_path):
    model, record = load_or_train(SMALL, tmp_path, progress=False)
    assert record["train_accuracy"] > 0.9
    assert record["validation_accuracy"] > 0.5  # unseen boards: chance is 1/7
    assert (tmp_path / f"judge-{SMALL.key()}.safetensors").exists()
    cached, again = load_or_train(SMALL, tmp_path, progress=False)
    assert again == record
    assert accuracy(cached, training_patches(SMALL)) == record["train_accuracy"]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cached.state_dict().values()))
