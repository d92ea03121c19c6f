"""The README and docs/ say only what the project does: the make targets, links, modules, settings and
functions they name exist, and the README stays a short first read."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import subprocess
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?:^|[\s;&|(\0])make\s+((?:[A-Z_]+=\S+\s+)*)([a-z][a-z0-9-]*)", re.M)
MODULE = re.compile(r"-m\s+(dmgr(?:\.[A-Za-z_]\w*)*)")


def code_of(text: str) -> str:
    """Every fenced block (without shell comments) and inline code span of a markdown text, NUL-separated."""
    blocks = [re.sub(r"\s#\s.*$", "", m.group(0), flags=re.M) for m in FENCE.finditer(text)]
    return "\0".join(blocks + INLINE.findall(FENCE.sub("", text)))


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_readme_is_a_short_first_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the long form to docs/"
    first_screen = "\n".join(lines[:120])
    for needed in ("checkpoints/demo/preview.png", "make synth", "make test", "webdataset", "mask.png"):
        assert needed in first_screen, f"README's first 120 lines lack {needed!r}"


def test_docs_name_only_make_targets_that_exist():
    targets = makefile_targets()
    named = {(page.name, m.group(2)) for page in PAGES for m in MAKE.finditer(code_of(page.read_text()))}
    assert len(named) > 20, "the pattern found almost no make commands: is it still matching?"
    missing = sorted(f"{page}: make {target}" for page, target in named if target not in targets)
    assert not missing, f"make targets named in the docs but not in the Makefile: {missing}"


def test_relative_links_resolve():
    checked, broken = 0, []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no heading with that anchor)")
    assert checked > 30, "almost no links found: is the pattern still matching?"
    assert not broken, "\n".join(broken)


def test_every_module_named_with_python_m_runs():
    names = {m.group(1).rstrip(".") for page in PAGES for m in MODULE.finditer(page.read_text())}
    assert {"dmgr.synth", "dmgr.train", "dmgr.eval", "dmgr.export"} <= names
    for name in sorted(names):
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"python -m {name}: no such module"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{name}.__main__") is not None, f"python -m {name}: no __main__"


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _leaves(cls, prefix: str, sections: dict[str, dict]) -> set[str]:
    """Every dotted key of a settings dataclass; `sections` gives the contents of its dict-typed sections."""
    keys = set()
    for name, hint in _fields(cls).items():
        key = f"{prefix}{name}"
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if key in sections:
            keys |= {f"{key}.{leaf}" for leaf in sections[key]}
        elif dataclasses.is_dataclass(inner):
            keys |= _leaves(inner, f"{key}.", sections)
        else:
            keys.add(key)
    return keys


def schema_keys() -> dict[str, set[str]]:
    from dmgr.sampler.settings import DMGRSettings
    from dmgr.synth.config import ModelSettings, NetworkSettings, SynthSettings
    from dmgr.train import TrainSettings

    net = [f.name for f in dataclasses.fields(NetworkSettings)]
    model = [f.name for f in dataclasses.fields(ModelSettings)] + [f"{w}.{n}" for w in ("global", "local") for n in net]
    schedule = ["name", "respacing", *(f.name for f in dataclasses.fields(DMGRSettings))]
    synth = _leaves(SynthSettings, "", {"model": {k: None for k in model}, "schedule": {k: None for k in schedule}})
    return {"key": synth, "training key": _leaves(TrainSettings, "", {})}


def documented_keys() -> dict[str, set[str]]:
    """The keys in the first column of docs/configuration.md's tables, by the column's header."""
    found: dict[str, set[str]] = {}
    header = None
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        first = line.split("|")[1].strip()
        if header is None:
            header = first
        elif not set(first) <= set("-: "):
            found.setdefault(header, set()).update(INLINE.findall(first))
    return found


# Set by the job itself, not by users (ScreenSettings: "set by validate").
INTERNAL_KEYS = {"screen.data_digest", "screen.classifier_key"}  # set by validate, never by a user


def test_configuration_reference_matches_the_schema():
    schema, documented = schema_keys(), documented_keys()
    assert set(documented) == {"key", "training key"}, f"tables by header: {sorted(documented)}"
    for table, keys in documented.items():
        unknown = sorted(keys - schema[table])
        assert not unknown, f"docs/configuration.md ({table}) names settings the schema lacks: {unknown}"
        missing = sorted(schema[table] - keys - INTERNAL_KEYS)
        assert not missing, f"settings missing from docs/configuration.md ({table}): {missing}"


def test_algorithm_page_names_functions_that_exist():
    rows = re.findall(r"^\|[^|]+\|([^|]+)\|\s*`(dmgr/[\w/]+)\.py`\s*\|$",
                      (ROOT / "docs" / "algorithm.md").read_text(), re.M)
    assert len(rows) >= 10, "the code map of docs/algorithm.md was not found"
    for names, path in rows:
        module = importlib.import_module(path.replace("/", "."))
        for name in INLINE.findall(names):
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
                assert obj is not None, f"docs/algorithm.md: {path}.py has no {name}"


@pytest.mark.parametrize("goal", [[], ["help"]])
def test_make_help_lists_every_target_with_a_line(goal):
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    out = subprocess.run(["make", "-s", "-C", str(ROOT), *goal], capture_output=True, text=True, check=True).stdout
    described = {m.group(1) for m in re.finditer(r"^\s*make (\S+)\s+\S", out, re.M)}
    assert set(phony) <= described, f"targets without a line in make help: {sorted(set(phony) - described)}"
