"""The README stays true: its options table and its quick start (make demo, then make test)."""

from __future__ import annotations

import re
from pathlib import Path

from hetero.compiler.config import option_docs

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_options_table_lists_every_option() -> None:
    section = README.split("### Options", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert documented == set(option_docs())


def test_quick_start_is_make_demo_then_make_test() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert quick.index("make demo") < quick.index("make test")


def test_zoo_list_in_readme_matches_the_zoo() -> None:
    from hetero import zoo

    for name in zoo.names():
        assert name in README
