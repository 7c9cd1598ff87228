"""spp_jax as a library: `import spp_jax` needs only jax, flax and numpy, and the wheel that
`pip install .` builds holds spp_jax alone and works in a fresh virtualenv with only those."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import spp_jax
from tests.reference import pool_ref, project_ref, roi_pool_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("jax", "jaxlib", "flax", "numpy")  # pyproject's dependencies (+ jaxlib, pinned with jax)
# What the extras bring: none of it may be imported by `import spp_jax`, pool or roi_pool.
EXTRAS_MODULES = {"optax", "orbax", "tensorflow_datasets", "tensorflow", "grain", "array_record", "cv2",
                  "matplotlib", "tqdm", "sklearn", "torch"}
LEVELS, ROI_LEVELS = (3, 2, 1), (2, 1)
STRIDE, OFFSET, SLACK = 16, 8.0, 1.5

# Runs in the interpreter under test: pools the inputs, reports what it imported.
PROBE = """
import importlib.metadata, json, sys
import numpy as np
import spp_jax

with np.load(sys.argv[1]) as z:
    x, fmap, boxes = z["x"], z["fmap"], z["boxes"]
geometry = spp_jax.Geometry(stride={stride}, offset={offset}, slack={slack})
np.savez(sys.argv[2], pooled=np.asarray(spp_jax.pool(x, levels={levels})),
         windows=np.asarray(spp_jax.roi_pool(fmap, boxes, levels={roi_levels}, geometry=geometry)))
try:
    installed = importlib.metadata.version("spp_jax")
except importlib.metadata.PackageNotFoundError:
    installed = None
from spp_jax import native
print(json.dumps({{"file": spp_jax.__file__, "version": spp_jax.__version__, "installed": installed,
                  "native": native.available(),
                  "modules": sorted({{m.split(".")[0] for m in sys.modules}})}}))
""".format(stride=STRIDE, offset=OFFSET, slack=SLACK, levels=LEVELS, roi_levels=ROI_LEVELS)


def _pins():
    pins = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _run_probe(python, tmp, env):
    """Pool random inputs with `python`; check against the brute-force references; return its report."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    fmap = rng.standard_normal((9, 11, 4)).astype(np.float32)
    boxes = np.array([[0, 0, 175, 143], [20, 30, 90, 60], [100, 5, 110, 12], [150, 120, 400, 300]], np.float32)
    np.savez(tmp / "in.npz", x=x, fmap=fmap, boxes=boxes)
    (tmp / "probe.py").write_text(PROBE)
    out = subprocess.run([python, str(tmp / "probe.py"), str(tmp / "in.npz"), str(tmp / "out.npz")],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = np.array([project_ref(b, STRIDE, OFFSET, SLACK, fmap.shape[0], fmap.shape[1]) for b in boxes])
    with np.load(tmp / "out.npz") as z:
        np.testing.assert_array_equal(z["pooled"], pool_ref(x, LEVELS))
        np.testing.assert_array_equal(z["windows"], roi_pool_ref(fmap, cells, ROI_LEVELS))
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not EXTRAS_MODULES & set(report["modules"]), "imported an extra's module"
    assert {"jax", "flax", "numpy"} <= set(report["modules"])
    return report


def test_import_spp_jax_needs_only_the_core_dependencies(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    report = _run_probe(sys.executable, tmp_path, env)
    assert os.path.realpath(os.path.dirname(report["file"])) == os.path.realpath(os.path.join(ROOT, "spp_jax"))


def _copy_repo(dst):
    """The repository as a clone has it (bench/, results/, experiments/ and tests/ included, so
    package discovery is tested against them), without venvs, run outputs and build leftovers."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "workdir", "__pycache__", ".pytest_cache", "build", "dist", "*.egg-info",
        ".jax_cache"))


def _pip(*args, timeout=900):
    out = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"pip {' '.join(args)}:\n{out.stderr[-3000:]}"
    return out.stdout


def _skip_without_index(pin):
    """Skip (quickly) only when no package index answers for jax."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "jax", "--timeout", "10",
                              "--retries", "0"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no package index reachable: `pip index versions jax` timed out")
    if out.returncode != 0:
        pytest.skip(f"no package index reachable: `pip index versions jax` failed "
                    f"({(out.stderr.strip().splitlines() or ['?'])[-1]})")
    assert pin in out.stdout, f"the package index has no jax=={pin}:\n{out.stdout}"


@pytest.mark.slow  # 30-65 s here (wheel build, venv, core installs); `make test` runs it
def test_wheel_holds_spp_jax_only_and_works_with_only_the_core_dependencies(tmp_path):
    pins = _pins()
    _skip_without_index(pins["jax"])
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    _copy_repo(src)
    _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(src))  # what `pip install .` builds

    (wheel,) = wheels.iterdir()
    dist_info = f"spp_jax-{spp_jax.__version__}.dist-info"
    assert wheel.name == f"spp_jax-{spp_jax.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"spp_jax", dist_info}
    sources = {os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
               for d, _, fs in os.walk(src / "spp_jax") for f in fs if f.endswith((".py", ".cc", ".h"))}
    # the native kernels' sources, built at first use
    assert {"spp_jax/native/conv.cc", "spp_jax/native/pool.cc", "spp_jax/native/winograd.cc",
            "spp_jax/native/parallel.h"} <= sources
    assert {n for n in names if n.startswith("spp_jax/")} == sources  # every subpackage, nothing else
    assert f"{dist_info}/licenses/LICENSE" in names

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    _pip("--python", py, "install", "--quiet", "--no-compile", *(f"{p}=={pins[p]}" for p in CORE))
    _pip("--python", py, "install", "--quiet", "--no-compile", "--no-deps", str(wheel))
    assert "No broken requirements" in _pip("--python", py, "check")  # the core dependencies suffice

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    report = _run_probe(py, tmp_path, env)
    assert os.path.realpath(report["file"]).startswith(os.path.realpath(venv))
    # The installed package builds its native kernels from the source it ships (where a
    # compiler exists; elsewhere it falls back to XLA's convolutions).
    from spp_jax import native
    assert report["native"] == (shutil.which(os.environ.get("CXX") or "c++") is not None
                                and native.cpu_supported())
    assert report["version"] == report["installed"] == spp_jax.__version__
