"""The layers of README's "How it is built": imports point down only. common/ imports no role and
no application module; each role (actors, replay_server, learner) imports only common/ (a type
named under `if TYPE_CHECKING:` is no import); nothing below launch/ imports launch/."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROLES = ("actors", "replay_server", "learner")
# package → the first-party packages it must not import
DYNAMIC = {f"<{name}>" for name in ("importlib.import_module", "import_module", "__import__")}
FORBIDDEN = {
    "common": {*ROLES, "launch", *DYNAMIC},
    **{role: {*(other for other in ROLES if other != role), "launch", *DYNAMIC} for role in ROLES},
}


DYNAMIC_IMPORTS = {"importlib.import_module", "import_module", "__import__"}


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:` exactly (not `not ...`, not `... or`)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_packages(tree: ast.AST) -> set[str]:
    """Top-level package names imported anywhere in `tree` (functions included), leaving out
    what `if TYPE_CHECKING:` blocks import; a dynamic import shows as "<its function>"."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Call) and ast.unparse(node.func) in DYNAMIC_IMPORTS:
            found.add(f"<{ast.unparse(node.func)}>")  # what it imports is not known here
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_check_sees_imports_and_skips_type_checking_blocks():
    source = (
        "import os\nfrom learner.learner import Learner\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from replay_server.replay import Sample\n"
        "def f():\n    import launch.cli\n"
    )
    assert imported_packages(ast.parse(source)) == {"os", "learner", "typing", "launch"}
    # a runtime import under a condition that merely mentions TYPE_CHECKING counts
    runtime = (
        "if not TYPE_CHECKING:\n    import launch\nif TYPE_CHECKING or x:\n    import actors\n"
    )
    assert imported_packages(ast.parse(runtime)) == {"launch", "actors"}
    dynamic = "import importlib\nimportlib.import_module('launch.cli')\n"
    assert imported_packages(ast.parse(dynamic)) == {"importlib", "<importlib.import_module>"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_lower_layer_imports_nothing_above_or_beside_it(package):
    crossing = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(ast.parse(path.read_text(), str(path))) & FORBIDDEN[package]
        if bad:
            crossing[str(path.relative_to(ROOT))] = sorted(bad)
    assert not crossing, f"imports that cross the layers: {crossing}"
