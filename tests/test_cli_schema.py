"""CLI options derived from settings dataclasses (dmgr.cli.add_settings / settings_from): each default is
written once, in the dataclass, and a bad value is one line naming the option."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from dmgr.cli import add_settings, option_name, settings_from
from dmgr.schema import STRICT_SECTION, Count, Flag

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Toy:
    __pydantic_config__ = STRICT_SECTION
    target: Annotated[Path, Field(description="where it goes")]
    rounds: Annotated[Count(), Field(description="how many, at 100% each")] = 3
    rate: float | None = None
    mode: Literal["fast", "paper"] = "paper"
    quiet: Annotated[Flag, Field(description="no bars")] = False
    sizes: tuple[int, ...] = (256, 64)
    label: str = "x"


def toy_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_settings(parser, Toy, **kwargs)
    return parser


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_add_settings_maps_types_defaults_choices_and_flags():
    found = actions(toy_parser())
    assert set(found) == {f.name for f in dataclasses.fields(Toy)}
    assert found["target"].required and found["target"].type is Path and found["target"].help == "where it goes"
    assert found["rounds"].option_strings == ["--rounds"] and found["rounds"].type is int
    assert found["rounds"].default == 3 and found["rounds"].help == "how many, at 100%% each (default 3)"
    assert found["rate"].type is float and found["rate"].default is None and not found["rate"].required
    assert found["mode"].choices == ("fast", "paper") and found["mode"].default == "paper"
    assert isinstance(found["quiet"], argparse.BooleanOptionalAction) and found["quiet"].default is False
    assert found["quiet"].option_strings == ["--quiet", "--no-quiet"]
    assert found["sizes"].nargs == "+" and found["sizes"].type is int and found["sizes"].default == (256, 64)
    assert option_name("patches_per_class") == "--patches-per-class"


def test_help_shows_each_default_once_and_a_percent_sign():
    text = " ".join(toy_parser().format_help().split())
    assert "how many, at 100% each (default 3)" in text and "(default 256 64)" in text and "(default x)" in text


def test_add_settings_skips_fields_and_takes_help_for_foreign_dataclasses():
    found = actions(toy_parser(skip=("label",), help={"mode": "the schedule"}))
    assert "label" not in found and found["mode"].help == "the schedule (default paper)"


def test_settings_from_builds_the_checked_dataclass():
    parser = toy_parser()
    args = parser.parse_args(["--target", "out", "--rounds", "5", "--mode", "fast", "--quiet", "--sizes", "32"])
    assert settings_from(parser, args, Toy) == Toy(Path("out"), 5, None, "fast", True, (32,), "x")
    assert settings_from(parser, parser.parse_args(["--target", "o"]), Toy) == Toy(Path("o"))


def test_settings_from_a_bad_value_is_one_line_naming_the_option(capsys):
    parser = toy_parser()
    with pytest.raises(SystemExit) as stop:
        settings_from(parser, parser.parse_args(["--target", "o", "--rounds", "0"]), Toy)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "toy: error: --rounds=0: must be >= 1\n"


def entry_points() -> list[tuple[str, argparse.ArgumentParser, type]]:
    """(name, the parser that reads the options, the settings dataclass they come from)."""
    from dmgr import bench, bench_job, preview, sweep
    from dmgr.data import export as data_export
    from dmgr.data import importers, sheet
    from dmgr.export import __main__ as export_main
    from dmgr.models.performance import PerformanceSettings

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        return parser._subparsers._group_actions[0].choices[name]

    found = [
        ("bench", bench.parser(), bench.BenchSettings),
        ("bench performance", bench.parser(), PerformanceSettings),
        ("bench_job", bench_job.parser(), bench_job.BenchJobSettings),
        ("data.export", data_export.parser(), data_export.DataExportSettings),
        ("data.sheet", sheet.parser(), sheet.SheetSettings),
        ("preview", preview.parser(), preview.PreviewSettings),
        ("sweep", sweep.parser(), sweep.SweepReportSettings),
        ("export", export_main.parser(), export_main.ExportOptions),
        ("importers folder", sub(importers.parser(), "folder"), importers.FolderImport),
    ]
    for command in ("voc", "coco", "masks"):
        found.append((f"importers {command}", sub(importers.parser(), command), importers.PatchImport))
    return found


NAMES = ["bench", "bench performance", "bench_job", "data.export", "data.sheet", "preview", "sweep", "export",
         "importers folder", "importers voc", "importers coco", "importers masks"]


def entry_point(name: str) -> tuple[argparse.ArgumentParser, type]:
    return next((parser, cls) for found, parser, cls in entry_points() if found == name)


def test_every_entry_point_is_checked():
    assert [name for name, _, _ in entry_points()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_entry_point_defaults_are_the_settings_defaults(name):
    parser, cls = entry_point(name)
    options = actions(parser)
    for field in dataclasses.fields(cls):
        assert field.name in options, f"{name}: {option_name(field.name)} is missing"
        if field.default_factory is not dataclasses.MISSING:
            assert options[field.name].default == field.default_factory(), name
        elif field.default is dataclasses.MISSING:
            assert options[field.name].required, f"{name}: {option_name(field.name)} has no default: required"
        else:
            assert options[field.name].default == field.default, f"{name}: {option_name(field.name)}"


@pytest.mark.parametrize("name", NAMES)
def test_help_names_every_setting_with_its_default(name):
    parser, cls = entry_point(name)
    text = " ".join(parser.format_help().split())
    for field in dataclasses.fields(cls):
        assert option_name(field.name) in text, name
        shown_at_all = field.default not in (dataclasses.MISSING, None) and not isinstance(field.default, bool)
        if shown_at_all:
            shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
            assert f"(default {shown})" in text, f"{name}: {option_name(field.name)}"


@pytest.mark.parametrize("name", NAMES)
def test_every_option_with_a_default_comes_from_a_settings_dataclass(name):
    """An option with a default of its own (not None, not a hidden internal flag) would write it twice."""
    parser, _ = entry_point(name)
    owned = {f.name for _, p, c in entry_points() if p.prog == parser.prog for f in dataclasses.fields(c)}
    own_defaults = [a.option_strings[0] for a in actions(parser).values()
                    if a.default is not None and a.help != argparse.SUPPRESS and a.dest not in owned]
    assert own_defaults == [], name


def test_a_bad_option_value_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "dmgr.preview", "missing.tar", "--max", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["python -m dmgr.preview: error: --max=0: must be >= 1"]
