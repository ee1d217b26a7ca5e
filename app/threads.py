"""How many CPU threads torch uses for a generation (MUSICGEN_CPU_THREADS), set on the thread that generates.

torch's intra-op pool is OpenMP's, and OpenMP's thread count belongs to the thread that sets it: the service
sets it on its one generation thread (app/generation.py), before that thread loads or runs the model.
On cores shared with other work, OpenMP threads that spin while they wait for each other collapse (a 1 s clip
took 32 s with 2 spinning threads against 6.4 s with 1): `scripts/gunicorn.conf.py` sets OMP_WAIT_POLICY=PASSIVE
before torch starts OpenMP in the worker, so waiting threads sleep instead. Since the decoding step became a few
hundred small int8 products (app/fast_lm.py, app/lean_step.py), sleeping and waking between them costs more than
a second core gains: one thread is the default (README, "Threads and shared cores").
"""

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve(setting: int) -> int:
    """MUSICGEN_CPU_THREADS: 0 means every core this process may use."""
    return setting if setting > 0 else available_cores()


def apply(setting: int) -> int:
    """Set torch's threads for the calling thread (and the pools it starts); returns the count in effect."""
    threads = resolve(setting)
    torch.set_num_threads(threads)
    log.info("torch CPU threads %d of %d cores (OMP_WAIT_POLICY=%s)", torch.get_num_threads(), available_cores(),
             os.environ.get("OMP_WAIT_POLICY", "unset"))
    return threads
