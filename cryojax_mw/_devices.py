"""One JAX CPU device per core, so that independent work (sampler chains) can use every core.

JAX exposes the whole CPU as one device. With one CPU device per core, `run_chains` splits the
chains among them (`shard_map`), so work that XLA:CPU keeps on one thread still uses every core.
(With jax 0.10 XLA:CPU spreads large fused loops over its threads anyway: on 2 cores, 8 MWR chains
at 64^3 took the same time on one device as split over two.) The default device stays the first
CPU device, so single-device code runs as before; on a machine with a GPU the default backend is
the GPU and nothing changes.

JAX fixes its CPU device count when its backends start, which importing blackjax already does, so
this runs when cryojax_mw is imported. It leaves alone a count the user chose (the config option
`jax_num_cpu_devices` or the XLA flag `--xla_force_host_platform_device_count`) and a JAX that
has already started; to keep one CPU device, set either of those to 1 before importing cryojax_mw.
"""

from __future__ import annotations

import os

import jax


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_all_cpu_cores() -> bool:
    """Ask JAX for one CPU device per available core, unless the count was already chosen or JAX
    has already started. Returns whether the count was set."""
    chosen = jax.config.jax_num_cpu_devices >= 0 or "xla_force_host_platform_device_count" in (
        os.environ.get("XLA_FLAGS", "")
    )
    cores = available_cores()
    if chosen or cores < 2:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # JAX's backends are already running: their device count stands
        return False
    return True
