"""The README's "API at a glance" table is true: every name it lists imports
flat (``jaxopt_nn.<name>``) and from its module, as the same object."""

import importlib
import pathlib
import re

import pytest

import jaxopt_nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_ROW = re.compile(r"^\| `(\w+)` \| (.*) \|$")
_FLAT_ALIAS = re.compile(r"\(flat: `(\w+)`")


def _top_level_spans(cell: str) -> list[tuple[str, str]]:
    """(backticked span, text right after it) for spans outside parentheses.

    Parenthesised text holds arguments, methods and remarks, not API names.
    """
    spans, depth, i = [], 0, 0
    while i < len(cell):
        if cell[i] == "`":
            end = cell.index("`", i + 1)
            if depth == 0:
                spans.append((cell[i + 1 : end], cell[end + 1 :]))
            i = end + 1
            continue
        depth += {"(": 1, ")": -1}.get(cell[i], 0)
        i += 1
    return spans


def _table() -> list[tuple[str, str, str]]:
    """(module, name in the module, flat name) for every API name in the table."""
    text = README.read_text()
    section = text.split("## API at a glance", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = _ROW.match(line)
        if not match or match.group(1) == "module":
            continue
        module, cell = match.groups()
        for span, after in _top_level_spans(cell):
            name = re.match(r"[A-Za-z_]\w*", span)
            if name is None or "=" in span.split("(")[0]:
                continue
            alias = _FLAT_ALIAS.match(after.lstrip())
            rows.append((module, name.group(0), alias.group(1) if alias else name.group(0)))
    return rows


def test_the_table_lists_every_module_and_many_names():
    rows = _table()
    modules = {module for module, _, _ in rows}
    assert {"optim", "pruning", "archive", "huffman", "parallel", "data"} <= modules
    assert len(rows) > 60


@pytest.mark.parametrize(("module", "name", "flat"), _table())
def test_listed_name_imports_flat_and_from_its_module(module, name, flat):
    submodule = importlib.import_module(f"jaxopt_nn.{module}")
    assert hasattr(submodule, name), f"jaxopt_nn.{module} has no {name}"
    assert getattr(jaxopt_nn, flat, None) is getattr(submodule, name), (
        f"jaxopt_nn.{flat} is not jaxopt_nn.{module}.{name}"
    )
    assert flat in jaxopt_nn.__all__


def test_all_lists_only_importable_names_once():
    assert len(jaxopt_nn.__all__) == len(set(jaxopt_nn.__all__))
    missing = [name for name in jaxopt_nn.__all__ if not hasattr(jaxopt_nn, name)]
    assert missing == []


def test_package_ships_the_typed_marker():
    import importlib.resources

    assert importlib.resources.files("jaxopt_nn").joinpath("py.typed").is_file()
