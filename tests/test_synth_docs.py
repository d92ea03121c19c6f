"""What the docs say about the synthesis job holds in the code: the default schedule, what make targets write,
what synth imports from eval, the commands a user copies."""

from __future__ import annotations

import ast
import re

from hydra import compose, initialize_config_dir
from synth_support import ROOT

from dmgr import CONF_DIR
from dmgr.synth import config  # noqa: F401 - registers the schema defaults the configs compose


def read(name: str) -> str:
    return (ROOT / name).read_text()


def default_schedule() -> tuple[str, int]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="synth")
    return cfg.schedule.name, int(cfg.schedule.respacing)


def test_evaluation_names_the_default_schedule_the_config_has():
    name, steps = default_schedule()
    text = " ".join(read("docs/evaluation.md").split())
    claimed = re.findall(r"\*\*(\d+) \(default\)\*\*", text) + re.findall(r"the default is (\d+) steps", text)
    claimed += re.findall(r"[Tt]he default job \(`schedule=\w+`, (\d+) steps\)", text)
    assert all(int(n) == steps for n in claimed), (claimed, steps)
    assert all(s == name for s in re.findall(r"[Tt]he default job \(`schedule=(\w+)`", text)), name
    assert "default (4 attempts, flag" not in text  # the default writes the best attempt (screen.on_exhausted)


def test_what_the_docs_say_a_make_target_writes_is_in_its_recipe():
    makefile = read("Makefile")
    said = []
    for page in ("docs/troubleshooting.md", "docs/evaluation.md", "README.md"):
        for target, flags in re.findall(r"`make ([a-z-]+)` writes ((?:`extras\.\w+`(?:,| and| )*)+)",
                                        read(page)):
            said += [(page, target, flag) for flag in re.findall(r"extras\.(\w+)", flags)]
    assert said
    for page, target, flag in said:
        recipe = re.search(rf"^{target}:.*?(?=^\S)", makefile, re.S | re.M).group(0)
        variables = " ".join(re.findall(rf"^{v} = .*$", makefile, re.M)[0] for v in re.findall(r"\$\((\w+)\)",
                                                                                               recipe)
                             if re.findall(rf"^{v} = .*$", makefile, re.M))
        assert f"extras.{flag}=true" in recipe + variables, (page, target, flag)


def test_the_docs_name_every_eval_module_synth_imports_at_module_level():
    imported = set()
    for path in (ROOT / "dmgr" / "synth").glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: function-level imports are lazy
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dmgr.eval"):
                imported.add(node.module)
    layout = " ".join(read("docs/README.md").split())
    for module in imported:
        assert f"`{module}`" in layout, module


def test_the_readme_own_model_command_has_the_schedule_overrides_of_own_product():
    def schedule_overrides(text: str) -> set[str]:
        commands = re.findall(r"python -m dmgr\.synth [^`\n]*dataset=cells model=custom[^`]*?(?:\n\n|```)", text,
                              re.S)
        return {o for c in commands for o in re.findall(r"schedule\.\w+=\S+", c)}

    needed = schedule_overrides(read("docs/own-product.md"))
    assert needed and needed <= schedule_overrides(read("README.md")), needed
