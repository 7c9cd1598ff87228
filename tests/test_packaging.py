"""Packaging metadata agrees with the tested environment: pyproject ranges hold requirements.txt's
pins, the accelerator requirement files add only JAX's own extras at the pinned version, `make
setup ACCEL=...` installs the right file, and the version has one source and a changelog entry."""
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import spp_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELS = ("cuda12", "cuda13", "tpu")


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirements(name):
    """Requirement lines of a requirements file, with `-r` includes expanded."""
    reqs = []
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            reqs += _requirements(line[3:].strip())
        elif line:
            reqs.append(Requirement(line))
    return reqs


def _pins(name):
    out = {}
    for r in _requirements(name):
        (spec,) = r.specifier  # every line is an exact pin
        assert spec.operator == "==", f"{name}: {r} is not an exact pin"
        out.setdefault(canonicalize_name(r.name), []).append((spec.version, sorted(r.extras)))
    return out


def _declared():
    """pyproject's requirements on other projects: core and every extra (self-references dropped)."""
    project = _pyproject()["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {g: [Requirement(s) for s in specs if canonicalize_name(Requirement(s).name) != "spp-jax"]
            for g, specs in groups.items()}


def test_pyproject_ranges_hold_the_tested_pins():
    pins = _pins("requirements-bench.txt")  # requirements.txt plus torch/torchvision
    declared = _declared()
    assert {canonicalize_name(r.name) for r in declared["core"]} == {"jax", "flax", "numpy"}
    for group, reqs in declared.items():
        for r in reqs:
            name = canonicalize_name(r.name)
            assert name in pins, f"[{group}] {r}: no tested pin in requirements*.txt"
            (version, _), = pins[name]
            assert r.specifier.contains(version), f"[{group}] {r} excludes the tested {name}=={version}"
            assert any(s.operator == "<" for s in r.specifier), f"[{group}] {r}: no upper bound"
    # ... and every pin of the tested environment belongs to the core or an extra
    covered = {canonicalize_name(r.name) for reqs in declared.values() for r in reqs} | {"jaxlib"}
    assert set(_pins("requirements.txt")) <= covered


@pytest.mark.parametrize("accel", ACCELS)
def test_accelerator_requirements_are_the_cpu_pins_plus_jax_extra(accel):
    cpu, acc = _pins("requirements.txt"), _pins(f"requirements-{accel}.txt")
    ((jax_version, _),) = cpu["jax"]
    assert acc.pop("jax") == [(jax_version, []), (jax_version, [accel])]  # same jax, plus its extra
    assert acc == {k: v for k, v in cpu.items() if k != "jax"}  # every other pin unchanged
    # The extra exists in the installed (pinned) jax's own metadata, with a jaxlib pinned to ours.
    meta = importlib.metadata.metadata("jax")
    assert meta["Version"] == jax_version and accel in meta.get_all("Provides-Extra")
    ((jaxlib_version, _),) = cpu["jaxlib"]
    needs = [Requirement(s) for s in importlib.metadata.requires("jax")]
    jaxlib = [r for r in needs if r.name == "jaxlib" and r.marker and r.marker.evaluate({"extra": accel})]
    assert jaxlib and all(r.specifier.contains(jaxlib_version) for r in jaxlib)


def _make(*args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", ROOT, *args], capture_output=True, text=True,
                          env=env, timeout=60)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
@pytest.mark.parametrize("accel", (None, "cpu") + ACCELS)
def test_make_setup_installs_the_accelerator_file(tmp_path, accel):
    out = _make("-n", "setup", f"VENV={tmp_path}/venv", *([f"ACCEL={accel}"] if accel else []))
    assert out.returncode == 0, out.stderr
    wanted = "requirements.txt" if accel in (None, "cpu") else f"requirements-{accel}.txt"
    installs = [ln for ln in out.stdout.splitlines() if " -m pip install --quiet -r " in ln]
    assert installs == [f"{tmp_path}/venv/bin/python -m pip install --quiet -r {wanted}"]


@needs_make
def test_make_rejects_an_unknown_accel_in_one_line(tmp_path):
    out = _make("-n", "setup", f"VENV={tmp_path}/venv", "ACCEL=rocm")
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().endswith("ACCEL=rocm is not one of: cpu cuda12 cuda13 tpu.  Stop.")
    assert len(out.stderr.strip().splitlines()) == 1


FAKE_PYTHON = """#!/bin/sh
# Records how make calls it; `-m venv DIR` makes DIR/bin/python a copy of this script.
echo "$*" >> "$FAKE_PYTHON_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


@needs_make
def test_make_setup_remembers_and_switches_accelerators(tmp_path):
    fake, log, venv = tmp_path / "python", tmp_path / "calls.log", tmp_path / "venv"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, FAKE_PYTHON_LOG=str(log))

    def setup(*accel):
        start = len(log.read_text().splitlines()) if log.exists() else 0
        out = _make("setup", f"VENV={venv}", f"PYTHON={fake}", *(f"ACCEL={a}" for a in accel), env=env)
        assert out.returncode == 0, out.stderr
        calls = log.read_text().splitlines()[start:]
        stamps = sorted(p.name for p in venv.iterdir() if p.name.startswith(".installed"))
        return out.stdout, calls, (venv / ".accel").read_text().strip(), stamps

    pip_r = "-m pip install --quiet -r "
    _, calls, accel, stamps = setup()
    assert calls == [f"-m venv {venv}", "-m pip install --quiet --upgrade pip", pip_r + "requirements.txt"]
    assert (accel, stamps) == ("cpu", [".installed"])
    # cpu -> cuda12 adds the plugin in place, and later commands keep cuda12
    _, calls, accel, stamps = setup("cuda12")
    assert calls == ["-m pip install --quiet --upgrade pip", pip_r + "requirements-cuda12.txt"]
    assert (accel, stamps) == ("cuda12", [".installed-cuda12"])
    assert setup()[1:] == ([], "cuda12", [".installed-cuda12"])
    # leaving an accelerator rebuilds the venv, so no plugin keeps JAX on the device
    for old, new, rebuilt in (("cuda12", "cpu", True), ("cpu", "tpu", False), ("tpu", "cuda13", True)):
        stdout, calls, accel, stamps = setup(new)
        assert (f"ACCEL changes from {old} to {new}: rebuilding {venv}" in stdout) == rebuilt
        assert (calls[0] == f"-m venv {venv}") == rebuilt
        assert calls[-1] == pip_r + ("requirements.txt" if new == "cpu" else f"requirements-{new}.txt")
        assert (accel, stamps) == (new, [".installed" + ("" if new == "cpu" else f"-{new}")])


def test_version_has_one_source_and_a_changelog_entry():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "spp_jax.__version__"}
    version = Version(spp_jax.__version__)
    heads = re.findall(r"^## \[([^\]]+)\]", open(os.path.join(ROOT, "CHANGELOG.md")).read(), re.M)
    released = [Version(h) for h in heads if h != "Unreleased"]
    assert released and released == sorted(released, reverse=True), heads
    if version.is_devrelease or version.is_prerelease:  # work towards the next release
        assert heads[0] == "Unreleased" and Version(version.base_version) > released[0]
    else:  # a release: its section is the newest
        assert released[0] == version and "Unreleased" not in heads
