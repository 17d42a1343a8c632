"""Checks an installed package: every distribution it requires (its extras' too, recursively) is
installed and no file its wheel put down is missing. pip's own `pip check` skips extras, so a
venv whose install stopped part-way (ray without `opencensus`, which `ray[default]` needs and
Ray's dashboard agent imports at start) passes it and fails later, in every Ray test.

Usage: python scripts/check_install.py DIST [EXTRA ...]. Prints one line per problem to stderr
and the names of the distributions to reinstall to stdout; exit 1 when there are problems, 2 when
the check itself cannot be made."""

import csv
import sys
from importlib.metadata import Distribution
from pathlib import PurePosixPath

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a venv without packaging: pip carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def recorded_files(dist):
    """The files the wheel's RECORD lists, compiled bytecode left out. Not `dist.files`: since
    Python 3.12 that leaves out the files that are missing."""
    record = dist.read_text("RECORD") or ""
    for row in csv.reader(record.splitlines()):
        if row and not row[0].endswith(".pyc") and "__pycache__" not in PurePosixPath(row[0]).parts:
            yield PurePosixPath(row[0])


def problems(name, extras=(), path=None):
    """(missing or damaged distribution, what is wrong) pairs, in the order found, one a
    distribution. The first distribution of a name on the path counts, as for an import."""
    found, walked, checked = [], set(), set()
    todo = [(name, frozenset(extras), None)]
    while todo:
        dist_name, dist_extras, wanted_by = todo.pop(0)
        canonical = canonicalize_name(dist_name)
        if (canonical, dist_extras) in walked:
            continue
        walked.add((canonical, dist_extras))
        dist = next(iter(Distribution.discover(name=dist_name, path=path or sys.path)), None)
        if dist is None:
            why = f"required by {wanted_by}" if wanted_by else "the package itself"
            found.append((dist_name, f"{dist_name} is not installed ({why})"))
            continue
        if canonical not in checked:
            checked.add(canonical)
            for file in recorded_files(dist):
                if not dist.locate_file(file).exists():
                    found.append((dist_name, f"{dist_name}: its file {file} is missing"))
                    break
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": extra} for extra in sorted(dist_extras) or [""]]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras), dist_name))
    return found


def main(argv):
    if not argv:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    try:
        found = problems(argv[0], [extra for extra in argv[1:] if extra])
    except Exception as error:  # an unreadable METADATA or requirement: not a missing file
        print(f"setup: cannot check the install of {argv[0]}: {error!r}", file=sys.stderr)
        return 2
    for _, why in found:
        print(f"setup: {why}", file=sys.stderr)
    for dist_name in dict.fromkeys(dist_name for dist_name, _ in found):
        print(dist_name)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
