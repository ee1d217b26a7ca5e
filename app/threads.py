"""How many CPU threads torch uses for a generation (MUSICGEN_CPU_THREADS), set on the thread that generates.

torch's intra-op pool is OpenMP's, and OpenMP's thread count belongs to the thread that sets it: the service
sets it on its one generation thread (app/generation.py), before that thread loads or runs the model.

A decoding step is a few hundred small int8 products (app/fast_lm.py, app/lean_step.py). Several threads pay only
while OpenMP's threads spin between them: on a 2-core machine to itself, 2 spinning threads made whole clips
1.2-1.5x faster than 1 (README, "Threads and shared cores"). But spinning threads that wait for each other
collapse as soon as another process takes a core (a 1 s clip: 6x the quiet time, against 2x for 1 thread), and
threads that sleep instead (OMP_WAIT_POLICY=PASSIVE) were slower than 1 thread quiet. Hence the default,
`CpuThreads(0)`: every core while no other process uses them, one thread while one does. After each step of a
generation on several threads, and between its layers, it reads the time this process's threads waited for a core
(schedstat): steps whose threads spent a quarter of their time waiting (over 0.25 s at least) go on on one thread.
On one thread it reads the other processes' CPU time on these cores (/proc/stat) once a window, and takes every core
back in the first window where they used less than a quarter of them: a quiet 30 s clip that a moment's burst had
dropped to one thread ran the rest of its ~30 s 1.3x slower before. The next generation looks first (that reading
over 50 ms) where the last one ended shared. A generation on a GPU gets one CPU thread (as before
this policy: the CPU only feeds the GPU). A count (1, 2, ...) is always that.
"""

import contextlib
import logging
import os
import time
import typing as tp

import torch

log = logging.getLogger(__name__)

# Above these shares, the cores count as shared: other processes' CPU time over the cores' time during a look; the
# time this process's threads waited for a core over a step's time (2 spinning threads under a CPU hog on each
# core: ~1.0; quiet: ~0.0).
BUSY_SHARE = 0.25
WAIT_SHARE = 0.25
# Waits are judged over steps that last this long at least: a 30 ms step preempted once by a kernel thread, or
# 0.1 s of steps during a burst of this host's agent, can wait a quarter of itself (a quiet 30 s clip dropped to one
# thread that way at 0.1 s); a neighbour that holds a core makes spinning threads wait all the time.
WAIT_WINDOW_SECONDS = 0.25
# How long a generation looks at the cores before it starts: /proc/stat counts in ticks of 10 ms, so 5 per core.
LOOK_SECONDS = 0.05


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve(setting: int) -> int:
    """The most threads MUSICGEN_CPU_THREADS gives a generation: 0 means every core this process may use."""
    return setting if setting > 0 else available_cores()


def others_busy_seconds() -> tp.Optional[float]:
    """CPU seconds spent on this process's cores so far, less this process's own (Linux; None elsewhere)."""
    try:
        cores = {f"cpu{core}" for core in os.sched_getaffinity(0)}
        with open("/proc/stat", "rb") as f:
            lines = f.read().decode().splitlines()
    except (AttributeError, OSError):
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in cores:  # user nice system idle iowait irq softirq steal ...
            ticks += sum(int(field) for field in fields[:8]) - int(fields[3]) - int(fields[4])
    own = os.times()
    return ticks / os.sysconf("SC_CLK_TCK") - (own.user + own.system)


def waited_seconds() -> tp.Optional[float]:
    """How long this process's threads have waited for a core so far (Linux schedstat; None elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for task in tasks:  # (a thread may end meanwhile)
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/self/task/{task}/schedstat", "rb") as f:
            total += int(f.read().split()[1])
    return total / 1e9


class CpuThreads:
    """MUSICGEN_CPU_THREADS for the generation thread: `apply` once when it starts, then `begin` before each
    generation and `step` after each of its decoding steps and between their layers. A count is fixed; 0 shares the
    cores (module doc)."""

    def __init__(self, setting: int, clock: tp.Callable[[], float] = time.monotonic,
                 sleep: tp.Callable[[float], None] = time.sleep,
                 others_busy: tp.Callable[[], tp.Optional[float]] = others_busy_seconds,
                 waited: tp.Callable[[], tp.Optional[float]] = waited_seconds):
        self.setting = setting
        self.most = resolve(setting)
        self.threads = self.most
        self._clock, self._sleep, self._others_busy, self._waited = clock, sleep, others_busy, waited
        self._stepped: tp.Tuple[float, tp.Optional[float]] = (0.0, None)  # when waits were last read, and them
        self._looked: tp.Tuple[float, tp.Optional[float]] = (0.0, None)  # when /proc/stat was last read, and it
        self._shared = False  # what the last generation found
        self._on_cpu = True

    @property
    def shares(self) -> bool:
        """Whether the count follows the other processes' use of the cores (0, on more than one core)."""
        return self.setting == 0 and self.most > 1

    def apply(self) -> int:
        """Set the calling thread's torch threads to the most this setting gives (to load the model)."""
        self._set(self.most)
        log.info("torch CPU threads %s of %d cores (OMP_WAIT_POLICY=%s)",
                 f"{self.most} while no other process uses them, else 1" if self.shares else self.most,
                 available_cores(), os.environ.get("OMP_WAIT_POLICY", "unset"))
        return self.most

    def begin(self, on_cpu: bool = True) -> int:
        """Before a generation: every core, unless the last generation found the cores shared and other processes
        still use a share of them (a look of `LOOK_SECONDS`, paid only then). A generation on a GPU runs one CPU
        thread when sharing: the CPU only feeds the GPU there."""
        self._on_cpu = on_cpu
        if self.shares and not on_cpu:
            self._set(1)
        elif self.shares:
            if self._shared:
                then, busy_then = self._clock(), self._others_busy()
                self._sleep(LOOK_SECONDS)
                now, busy = self._clock(), self._others_busy()
                self._shared = self._busy(then, busy_then, now, busy)
                self._looked = (now, busy)
            self._set(1 if self._shared else self.most)
            self._stepped = (self._clock(), self._waited())
        return self.threads

    def step(self) -> None:
        """After a decoding step or between its layers, once a `WAIT_WINDOW_SECONDS` window is over (so that one
        preemption is not a neighbour; /proc is read once a window, not at every step): on several threads, steps
        whose threads waited a share of their time for a core go on on one thread (spinning threads would collapse:
        a step can then take a second, hence the look between layers too); on one thread, a window in which other
        processes used less than their share of the cores (/proc/stat, as `begin` looks) takes every core back."""
        if not self.shares or not self._on_cpu:
            return
        now = self._clock()
        if self.threads == 1:
            then, busy_then = self._looked
            if now - then < WAIT_WINDOW_SECONDS:
                return
            busy = self._others_busy()
            self._looked = (now, busy)
            if not self._busy(then, busy_then, now, busy):
                log.info("the cores are free again: every core for this generation")
                self._shared = False
                self._set(self.most)
                self._stepped = (now, self._waited())
            return
        then, waited_then = self._stepped
        if now - then < WAIT_WINDOW_SECONDS:
            return
        waited = self._waited()
        self._stepped = (now, waited)
        if waited is None or waited_then is None or waited - waited_then > WAIT_SHARE * (now - then):
            log.info("another process uses the cores: one torch thread while it does")
            self._shared = True
            self._set(1)
            self._looked = (now, self._others_busy())

    def _busy(self, then: float, busy_then: tp.Optional[float], now: float, busy: tp.Optional[float]) -> bool:
        """Whether other processes used more than their share of the cores between two readings (or they failed)."""
        return busy is None or busy_then is None or busy - busy_then > BUSY_SHARE * self.most * (now - then)

    def on_step(self, stage: str) -> None:
        """`step` after each LM step and before each of its layers, for a generation's `on_step(stage)`
        (app/model.py)."""
        if stage in ("lm", "layer"):
            self.step()

    def _set(self, threads: int) -> None:
        self.threads = threads
        torch.set_num_threads(threads)
