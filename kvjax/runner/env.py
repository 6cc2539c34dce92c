"""Which device a run uses, and the record of where it ran (env.json).

`select_device("auto" | "cpu" | "gpu" | "tpu")` returns the JAX device a run executes on
(the runner wraps the whole run in `jax.default_device(...)`, so the same config runs
unchanged on any platform); an absent platform is a one-line error naming the ones
present. `environment(device)` reads versions, devices and host facts (the load average
when the run started and the CPU's last-level cache among them: a shared machine's load
says how far its timings can be trusted); it reports what the backend and the OS report
and nothing it cannot observe.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import jax

from .schema import ConfigError


def select_device(name: str):
    """This process's first device of the requested platform (auto: JAX's default backend).

    Local, not global, devices: with several processes, global device 0 belongs to
    process 0, and arrays placed there are not addressable by the others.
    """
    if name == "auto":
        return jax.local_devices()[0]
    try:
        return jax.local_devices(backend=name)[0]
    except RuntimeError:
        present = sorted({d.platform for d in jax.devices()})
        raise ConfigError(f"device: {name!r} requested but JAX found no {name} devices here "
                          f"(present: {', '.join(present)}); use device: auto or one of those") from None


def memory_stats(device) -> dict | None:
    """The backend's memory statistics for `device`, or None where it reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return dict(stats) if stats else None


def environment(device) -> dict:
    import flax
    import numpy as np

    import kvjax

    devices = jax.devices(device.platform)
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    return {
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": _jaxlib_version(), "flax": flax.__version__,
                     "numpy": np.__version__, "kvjax": kvjax.__version__},
        "backend": device.platform,
        "default_backend": jax.default_backend(),
        "device": {"id": device.id, "kind": device.device_kind, "platform": device.platform},
        "device_count": len(devices),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "process_count": jax.process_count(),
        "memory_stats": memory_stats(device),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "machine": platform.machine(), "processor": platform.processor() or None,
                 "cpu_count": os.cpu_count(), "cpus_usable": cpus_usable,
                 "load_average": load_average(), "last_level_cache_bytes": last_level_cache_bytes()},
        "env_vars": {k: v for k, v in os.environ.items()
                     if k.startswith(("JAX_", "XLA_")) or k in ("CUDA_VISIBLE_DEVICES", "TPU_NAME")},
        "git_commit": _git_commit(),
    }


def load_average() -> list[float] | None:
    """The OS's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def last_level_cache_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size in bytes of the highest-level CPU cache of cpu0, from Linux's sysfs
    (`index*/level` and `index*/size`, e.g. "307200K"); None where sysfs has no such files."""
    best = None
    for index in sorted(cpu_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip().upper()
            num, unit = (size[:-1], size[-1]) if size[-1:] in "KMG" else (size, "")
            nbytes = int(num) * _SIZE_UNITS[unit]
        except (OSError, ValueError):
            continue
        if best is None or level > best[0] or (level == best[0] and nbytes > best[1]):
            best = (level, nbytes)
    return None if best is None else best[1]


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def _git_commit():
    """The kvjax source checkout's commit, when it is one (editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None
