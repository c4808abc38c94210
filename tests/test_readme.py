"""The README stays true: its options table and its quick start (make demo, then make test)."""

from __future__ import annotations

import re
from pathlib import Path

from hetero.compiler.config import option_docs, options_table

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_options_table_is_the_one_generated_from_the_declarations() -> None:
    section = README.split("### Options", 1)[1].split("###", 1)[0]
    table = "".join(line + "\n" for line in section.splitlines() if line.startswith("|"))
    assert table == options_table(), (
        "README's options table differs from the options' declarations (hetero/compiler/config.py); "
        "paste the output of `python -c 'from hetero.compiler.config import options_table; "
        "print(options_table(), end=\"\")'` into README's Options section"
    )
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert documented == set(option_docs())


def test_quick_start_is_make_demo_then_make_test() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert quick.index("make demo") < quick.index("make test")


def test_zoo_list_in_readme_matches_the_zoo() -> None:
    from hetero import zoo

    for name in zoo.names():
        assert name in README
