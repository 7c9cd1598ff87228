"""spp_jax.devices: the start-up line names JAX's default backend and the devices it found."""
import ast
import glob
import json
import logging
import os
import subprocess
import sys

import jax
import pytest

from spp_jax import devices, host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_three_fake_devices_are_reported():
    # XLA_FLAGS must be set before jax is imported, hence the subprocess.
    code = ("import json, logging, jax\n"
            "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
            "from spp_jax.devices import log_devices\n"
            "r = log_devices()\n"
            "print(json.dumps({'backend': r.backend, 'local': list(r.local_devices), 'count': r.device_count,\n"
            "                  'jax_local': [str(d) for d in jax.local_devices()]}))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["backend"] == "cpu" and got["count"] == 3
    assert got["local"] == got["jax_local"] and len(set(got["local"])) == 3
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("spp_jax.devices: JAX backend:"))
    assert line.startswith("spp_jax.devices: JAX backend: cpu; 3 local device(s) [")
    assert all(d in line for d in got["local"]) and f"jax {jax.__version__}" in line


def test_log_devices_logs_the_default_backend(caplog):
    with caplog.at_level(logging.INFO, logger="spp_jax.devices"):
        report = devices.log_devices()
    assert report.backend == jax.default_backend()
    assert report.device_count == jax.device_count() and report.process_count == jax.process_count()
    host = [host_memory.describe()] if report.backend == "cpu" else []
    assert [r.getMessage() for r in caplog.records if r.name == "spp_jax.devices"] == [report.line()] + host
    assert f"JAX backend: {jax.default_backend()};" in report.line()


def test_distributed_start_comes_before_the_first_device_query(monkeypatch):
    # jax.distributed.initialize() fails once a backend exists, so log_devices must start it first.
    calls = []
    monkeypatch.setattr(devices, "_initialized", False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append("initialize"))
    real_local_devices = jax.local_devices
    monkeypatch.setattr(jax, "local_devices", lambda: calls.append("local_devices") or real_local_devices())
    devices.log_devices(distributed=True)
    devices.log_devices(distributed=True)  # once per process
    assert calls == ["initialize", "local_devices", "local_devices"]

    calls.clear()
    monkeypatch.setattr(devices, "_initialized", False)
    monkeypatch.setenv(devices.DISTRIBUTED_ENV, "1")  # the environment switch, as README says
    devices.log_devices()
    assert calls == ["initialize", "local_devices"]


def test_eval_entry_point_logs_the_device_line_first(tmp_path, caplog):
    from experiments import eval as eval_entry

    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exc:
        eval_entry.main(["--workdir", str(tmp_path / "missing")])
    assert str(exc.value).startswith("error: ")
    assert any(r.name == "spp_jax.devices" and r.getMessage().startswith(f"JAX backend: {jax.default_backend()};")
               for r in caplog.records)


def _entry_points():
    """experiments/*.py that run as `python -m` (they have a __main__ guard); helpers do not."""
    paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "[!_]*.py")))
    return [p for p in paths if 'if __name__ == "__main__":' in open(p).read()]


@pytest.mark.parametrize("path", _entry_points(), ids=os.path.basename)
def test_every_entry_point_main_logs_devices(path):
    tree = ast.parse(open(path).read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    called = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "log_devices" in called, f"{os.path.basename(path)}: main() does not call log_devices()"
