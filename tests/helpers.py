"""Helpers that several test modules share, one copy each (imported as `helpers`: pytest
puts this folder on `sys.path`)."""
import os
import subprocess
import sys

# only a hung child process takes this long, even on a loaded 2-core machine
LIMIT_S = 1800


def cpu_devices_env(count: int) -> dict:
    "This process's environment, with JAX on `count` simulated CPU devices."
    flags = f"--xla_force_host_platform_device_count={count}"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def run_python(args, devices: int, **options) -> subprocess.CompletedProcess:
    "`python ARGS` in a child process on `devices` simulated CPU devices, text output."
    options.setdefault("timeout", LIMIT_S)
    return subprocess.run(
        [sys.executable, *args], env=cpu_devices_env(devices), capture_output=True,
        text=True, **options
    )
