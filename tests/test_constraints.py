"""constraints.txt (README "Tested versions"): the versions the suite runs on, pinned for every
requirement of setup.py, inside setup.py's own ranges, and the ones installed where this runs
(make installs with it)."""

import importlib.metadata
import pathlib
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
DIST = "cdiscount-beam"


def pins() -> dict:
    """{canonical name: version} of constraints.txt's `name==version` lines."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in found, f"{name} pinned twice"
            found[canonicalize_name(name)] = version
    return found


def requirements() -> list[Requirement]:
    """setup.py's requirements with the test extra (what make installs)."""
    return [Requirement(text) for text in importlib.metadata.requires(DIST)
            if Requirement(text).marker is None or Requirement(text).marker.evaluate({"extra": "test"})]


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} (setup.py) has no pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (requirement, pinned[name])
    assert pinned["tensorflow"] == pinned["tensorflow-cpu"]  # the GPU install: the same release


def test_the_suite_runs_on_the_pinned_versions():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (version, installed[name]) for name, version in pins().items()
             if name in installed and installed[name] != version}
    assert not wrong, f"pinned, installed: {wrong}; rebuild the venv with make (pip install -c constraints.txt)"
    missing = [canonicalize_name(r.name) for r in requirements() if canonicalize_name(r.name) not in installed]
    assert not missing, missing
    assert sys.version_info[:2] == (3, 11)  # as the README says CI ran


def test_make_and_the_readme_install_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q -c constraints.txt -e '.[test]'" in makefile
    assert re.search(r"^\$\(VENV\)/\.installed: .*constraints\.txt", makefile, re.M)  # a new pin rebuilds the venv
    readme = (REPO / "README.md").read_text()
    installs = re.findall(r"pip install [^`\n]*-e [^`\n]*", readme)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    pinned = pins()
    said = ", ".join(f"{name} {pinned[name]}" for name in ("tensorflow-cpu", "keras", "apache-beam"))
    assert f"CI: {said}, on Python 3.11" in readme
