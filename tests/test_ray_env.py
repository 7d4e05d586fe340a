"""The quieter Ray defaults: set only where unset, off with RAYLM_QUIET_RAY=0, read by Ray itself, and in
place when `serve run serve_app:...` imports the app (before it starts Ray)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import ray

from engine.serve.ray_env import PYTHON_READ, QUIET_RAY_ENV, apply_quiet_ray_env, shell_exports

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_fill_only_what_is_unset():
    env = {"RAY_event_stats": "1", "PATH": "/bin"}
    added = apply_quiet_ray_env(env)
    assert "RAY_event_stats" not in added and env["RAY_event_stats"] == "1"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert set(added) == set(QUIET_RAY_ENV) - {"RAY_event_stats"}
    assert env["PATH"] == "/bin"


def test_opt_out_keeps_rays_defaults():
    env = {"RAYLM_QUIET_RAY": "0"}
    assert apply_quiet_ray_env(env) == {} and env == {"RAYLM_QUIET_RAY": "0"}
    assert shell_exports({"RAYLM_QUIET_RAY": "0"}) == ""


def test_shell_exports_are_valid_shell():
    out = subprocess.run(["bash", "-c", shell_exports({}) + '\necho "$RAY_task_events_report_interval_ms"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == QUIET_RAY_ENV["RAY_task_events_report_interval_ms"]


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in QUIET_RAY_ENV and k != "RAYLM_QUIET_RAY"}


def test_rays_python_modules_read_theirs():
    env = _clean_env()
    apply_quiet_ray_env(env)
    code = ("import importlib, json; from engine.serve.ray_env import PYTHON_READ; "
            "print(json.dumps({k: getattr(importlib.import_module(m), a) for k, (m, a) in PYTHON_READ.items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    read = json.loads(out.stdout.strip().splitlines()[-1])
    assert read and all(float(read[k]) == float(QUIET_RAY_ENV[k]) for k in read)


def test_core_flags_are_names_rays_binaries_know():
    """RAY_<name> overrides the C++ RayConfig entry <name>: each name must be one the binaries carry."""
    so = (Path(ray.__file__).parent / "_raylet.so").read_bytes()
    for key in set(QUIET_RAY_ENV) - set(PYTHON_READ):
        assert key[len("RAY_"):].encode() in so, key


def test_importing_serve_app_sets_them_before_ray_starts():
    env = {**_clean_env(), "HF_HUB_OFFLINE": "1"}
    code = ("import json, os, ray, serve_app; assert not ray.is_initialized(); "
            "print(json.dumps({k: os.environ.get(k) for k in %r}))" % (list(QUIET_RAY_ENV),))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == QUIET_RAY_ENV
