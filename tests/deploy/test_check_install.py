"""scripts/check_install.py, which scripts/setup runs after pip: against hand-made installs (real
dist-info directories in a temporary site-packages), each problem named, and against this venv."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.deploy.compose import ROOT

SCRIPT = ROOT / "scripts" / "check_install.py"
spec = importlib.util.spec_from_file_location("check_install", SCRIPT)
check_install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_install)


def install(site, name, requires=(), files=(), lost=()):
    """A distribution as pip leaves it: NAME-1.0.dist-info with METADATA and RECORD, and FILES
    (RECORD lists LOST too, which are not written)."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"Requires-Dist: {req}" for req in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    for file in files:
        (site / file).parent.mkdir(parents=True, exist_ok=True)
        (site / file).write_text("")
    record = [f"{file},," for file in (*files, *lost)]
    record += [f"{name}/__pycache__/gone.cpython-313.pyc,,", f"{info.name}/METADATA,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


CASES = {
    "complete": (
        [("a", ["b>=1"], ["a/__init__.py"], []), ("b", [], ["b/__init__.py"], [])],
        [],
    ),
    "a requirement not installed": (
        [("a", ["b", "c"], ["a/__init__.py"], []), ("c", [], [], [])],
        [("b", "b is not installed (required by a)")],
    ),
    "an extra's requirement not installed (pip check misses it)": (
        [
            ("a", ["b[x]"], [], []),
            ("b", ["c; extra == 'x'", "d; extra == 'y'"], [], []),
        ],
        [("c", "c is not installed (required by b)")],
    ),
    "a file the wheel put down is gone": (
        [("a", ["b"], [], []), ("b", [], ["b/__init__.py"], ["b/metrics/export.py"])],
        [("b", "b: its file b/metrics/export.py is missing")],
    ),
    "a requirement for another Python is not needed": (
        [("a", ["b; python_version < '3.0'"], [], [])],
        [],
    ),
    "the package itself not installed": ([], [("a", "a is not installed (the package itself)")]),
    "names that differ in case, dots and underscores are one distribution": (
        [("a", ["Zope.Interface_X"], [], []), ("zope_interface_x", [], [], [])],
        [],
    ),
    "extras two levels down": (
        [
            ("a", ["b[x]"], [], []),
            ("b", ["c[y]; extra == 'x'"], [], []),
            ("c", ["d; extra == 'y'"], [], []),
        ],
        [("d", "d is not installed (required by c)")],
    ),
    "a damaged distribution reached twice is named once": (
        [("a", ["b", "c"], [], []), ("b", ["c[x]"], [], []), ("c", [], [], ["c/x.py"])],
        [("c", "c: its file c/x.py is missing")],
    ),
    "a script put down outside site-packages (../bin), present": (
        [("a", [], ["../bin/a-cli"], [])],
        [],
    ),
    "a script put down outside site-packages (../bin), gone": (
        [("a", [], [], ["../bin/a-cli"])],
        [("a", "a: its file ../bin/a-cli is missing")],
    ),
}


@pytest.mark.parametrize("dists, expected", CASES.values(), ids=CASES.keys())
def test_problems_of_a_hand_made_install(tmp_path, dists, expected):
    site = tmp_path / "lib" / "site-packages"  # ../bin stays inside tmp_path
    for name, requires, files, lost in dists:
        install(site, name, requires, files, lost)
    assert check_install.problems("a", path=[str(site)]) == expected


def test_a_distribution_without_record_has_only_its_requirements_checked(tmp_path):
    install(tmp_path, "a", ["b"])
    (tmp_path / "a-1.0.dist-info" / "RECORD").unlink()
    assert check_install.problems("a", path=[str(tmp_path)]) == [
        ("b", "b is not installed (required by a)")
    ]


def test_the_package_extras_are_followed(tmp_path):
    install(tmp_path, "a", ["z; extra == 'dev'"])
    assert check_install.problems("a", path=[str(tmp_path)]) == []
    assert check_install.problems("a", ["dev"], path=[str(tmp_path)]) == [
        ("z", "z is not installed (required by a)")
    ]


def test_this_venv_is_complete_and_a_missing_distribution_fails_the_script():
    ok = subprocess.run([sys.executable, SCRIPT, "mario-apex", "dev"], capture_output=True)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"", b"")
    bad = subprocess.run([sys.executable, SCRIPT, "no-such-dist-x"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout == "no-such-dist-x\n"
    assert "setup: no-such-dist-x is not installed (the package itself)" in bad.stderr


def test_a_check_that_cannot_be_made_exits_2_naming_the_error(tmp_path):
    install(tmp_path, "a", ["b >= = 1"])  # not a requirement
    env = {"PYTHONPATH": str(tmp_path)}  # first on the path: this `a` is the one found
    run = subprocess.run([sys.executable, SCRIPT, "a"], capture_output=True, text=True, env=env)
    assert (run.returncode, run.stdout) == (2, "")
    assert "setup: cannot check the install of a: InvalidRequirement(" in run.stderr
