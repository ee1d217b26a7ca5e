"""Torch threads under contention, for scripts/bench.py: the same clip, quiet and with a CPU hog on every core.

Each setting (thread count, OpenMP wait policy) runs in its own process, since OpenMP reads its wait policy
once, when torch loads it. Every process loads the model once, as the service does, and generates on one
long-lived thread that set its torch threads first (app/generation.py); the parent asks each in turn for the
same clip, round-robin, so every setting sees the same neighbours.

    .venv/bin/python -m scripts.bench_threads        # the table alone
"""

import contextlib
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = {"description": "90s rock song", "duration": 1, "seed": 1234}
# torch's allocator asks for transparent huge pages for blocks of 2 MB and more: tried, not the default (README)
HUGE_PAGES = "1 thread, huge pages (THP_MEM_ALLOC_ENABLE=1)"
DEFAULT = "the default: every core while no other process uses them, else 1"


def settings_to_compare(cores: int) -> tp.Dict[str, tp.Dict[str, str]]:
    """name -> environment: the default (every core while no other process uses them, else 1: app/threads.py),
    1 thread, with and without huge pages for torch's large blocks, and all cores always, OpenMP's threads
    spinning (its default) and waiting passively."""
    out = {DEFAULT: {"MUSICGEN_CPU_THREADS": "0", "OMP_WAIT_POLICY": ""},
           "1 thread": {"MUSICGEN_CPU_THREADS": "1", "OMP_WAIT_POLICY": ""},
           HUGE_PAGES: {"MUSICGEN_CPU_THREADS": "1", "OMP_WAIT_POLICY": "", "THP_MEM_ALLOC_ENABLE": "1"}}
    if cores > 1:
        out[f"{cores} threads always, OpenMP spinning (its default)"] = {"MUSICGEN_CPU_THREADS": str(cores),
                                                                         "OMP_WAIT_POLICY": ""}
        out[f"{cores} threads always, passive waiting"] = {"MUSICGEN_CPU_THREADS": str(cores),
                                                           "OMP_WAIT_POLICY": "PASSIVE"}
    return out


def child_environment(env: tp.Mapping[str, str]) -> tp.Dict[str, str]:
    """This process's environment for a child that runs a setting as the service would: `env` added, huge pages
    off unless `env` asks for them, torch's thread count left to MUSICGEN_CPU_THREADS, and OpenMP's wait policy
    dropped where `env` gives it empty."""
    environ = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0", **env}
    environ.pop("OMP_NUM_THREADS", None)
    if env.get("OMP_WAIT_POLICY") == "":
        environ.pop("OMP_WAIT_POLICY")
    return environ


class _Child:
    """One setting's process: loads the model, then generates the clip each time it reads a line."""

    def __init__(self, model: str, env: tp.Dict[str, str]):
        environ = child_environment({**env, "MUSICGEN_MODEL": model, "MUSICGEN_DEVICE": "cpu"})
        self.process = subprocess.Popen([sys.executable, "-m", "scripts.bench_threads", "--child"], cwd=ROOT,
                                        env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> tp.Dict[str, tp.Any]:
        return json.loads(self.process.stdout.readline())

    def run(self, cap: float = 0.0) -> float:
        """Seconds for the clip; a run stopped at `cap` seconds (0: none) reports `cap`."""
        self.process.stdin.write(f"{cap}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@contextlib.contextmanager
def hogs(count: int) -> tp.Iterator[None]:
    """`count` processes that spin on a core each (plain Python loops, as another tenant's work would)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def contention(model: str = "debug-small", rounds: int = 3, cap_ratio: float = 8.0) -> tp.Dict[str, tp.Any]:
    """Seconds for the same clip per setting, quiet and with a hog on every core, round-robin; the ratios are of
    each setting's time under contention to the best setting's quiet time. A run is stopped at `cap_ratio` times
    the best warm-up time (a collapsing setting would take minutes), and reports that cap: read it as "more"."""
    cores = len(os.sched_getaffinity(0))
    children = {name: _Child(model, env) for name, env in settings_to_compare(cores).items()}
    try:
        threads = {name: child.ready()["torch_threads"] for name, child in children.items()}
        warm: tp.List[float] = []  # 1 thread first: it cannot collapse, and it bounds the others' warm-up
        for child in sorted(children.values(), key=lambda child: child is not children["1 thread"]):
            warm.append(child.run(round(cap_ratio * min(warm), 1) if warm else 0.0))
        cap = round(cap_ratio * min(warm), 1)
        times: tp.Dict[str, tp.Dict[str, tp.List[float]]] = {"quiet": {n: [] for n in children},
                                                             "contended": {n: [] for n in children}}
        for _ in range(rounds):
            for phase in ("quiet", "contended"):
                with hogs(cores) if phase == "contended" else contextlib.nullcontext():
                    for name, child in children.items():
                        times[phase][name].append(child.run(cap))
    finally:
        for child in children.values():
            child.close()
    medians = {phase: {n: round(statistics.median(ts), 3) for n, ts in by.items()} for phase, by in times.items()}
    best = min(medians["quiet"].values())
    return {"model": model, "clip_seconds": CLIP["duration"], "cores": cores, "rounds": rounds, "hogs": cores,
            "cap_seconds": cap,
            "torch_threads": threads, "seconds": medians, "times": times,
            "contended_over_best_quiet": {n: round(t / best, 2) for n, t in medians["contended"].items()}}


def _step(policy: tp.Any, deadline: float, stage: str) -> None:
    """As the service's `on_step`: the threads' policy sees each step; past `deadline` the run stops."""
    policy.on_step(stage)
    if time.perf_counter() > deadline:
        raise TimeoutError


def _child() -> None:
    """Load as the service does, then generate on one long-lived thread that set its torch threads first and tells
    their policy of each generation and step (app/generation.py)."""
    sys.path.insert(0, str(ROOT))
    from app import threads as cpu_threads
    from app.config import Settings
    from app.model import MusicModel
    from app.params import GenerationParams

    settings = Settings.from_env()
    jobs: queue.Queue[tp.Optional[float]] = queue.Queue()
    done: queue.Queue[tp.Any] = queue.Queue()

    def work() -> None:
        policy = cpu_threads.CpuThreads(settings.cpu_threads)
        most = policy.apply()
        model = MusicModel.from_settings(settings)
        done.put({"torch_threads": f"{most}, else 1" if policy.shares else most})
        params = GenerationParams(**CLIP)
        while (cap := jobs.get()) is not None:
            t = time.perf_counter()
            policy.begin()
            with contextlib.suppress(TimeoutError):
                model.generate(params, CLIP["seed"],
                               functools.partial(_step, policy, t + cap if cap else float("inf")))
            done.put(min(time.perf_counter() - t, cap) if cap else time.perf_counter() - t)

    threading.Thread(target=work, daemon=True).start()
    print(json.dumps(done.get()), flush=True)
    for line in sys.stdin:
        jobs.put(float(line))
        print(done.get(), flush=True)
    jobs.put(None)


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child()
    else:
        print(json.dumps(contention(), indent=1))
