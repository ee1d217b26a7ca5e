"""Self-attention over a long context on two cores: the two halves of the CFG batch attend at once.

Where other processes use the cores, a generation runs on one torch thread (app/threads.py): its step is a few hundred
small products, and threads that sleep between them cost more than the second core gained, while spinning ones
collapse (README, "Threads and shared cores"). Attention over the KV cache is the exception to that one thread:
one large read per layer that grows with the context (at 1500 steps, the 24 layers of musicgen-small read 590 MB of
fp32 keys and values per step, ~45 ms on one core). Past `MIN_KEYS` keys, the second half of the batch (CFG's
unconditional rows) attends on a long-lived helper thread while the caller does the first: the same kernel on the
same rows, so the result is bit-identical, and the two cores together read the cache ~1.5x faster (a whole step:
0.95-1.13x at 600 steps, 1.17-1.25x at 1400, paired). Handing over costs ~75 us, more than the second core gains
over short contexts. The helper runs one torch thread and sleeps on a queue between jobs, so nothing spins; and
where another process holds the second core, a helper that has not started by the time the caller's half is done
leaves its job to the caller (`_Job`), so a step never waits for the scheduler to give the helper a turn (README,
"Attention on a second core"). It splits attention over an fp32 cache only: the fp16 cache (app/half_attention.py,
on by default where its kernel builds) has a kernel of its own that reads half the bytes.
"""

import functools
import queue
import threading
import typing as tp

import torch
from torch.nn import functional as F

__all__ = ["MIN_KEYS", "PairAttention", "shared"]

MIN_KEYS = 256  # measured on attention alone, 24 layers: 1.4x at 300 keys, 2.5x slower at 20


class _Job:
    """One half's attention, run by whichever thread claims it first: the helper, or the caller once its own half
    is done. The caller never waits for a helper that has not started (another process may hold the other core:
    then the caller does both halves, as on one core), only for one that is running the job."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.args = (q, k, v)
        self.inference = torch.is_inference_mode_enabled()  # thread-local: the helper takes the caller's
        self._claim = threading.Lock()
        self._claimed = False
        self.done = threading.Event()
        self.result: tp.Optional[torch.Tensor] = None
        self.error: tp.Optional[BaseException] = None

    def claim(self) -> bool:
        """True for the one thread that is to run it."""
        with self._claim:
            claimed, self._claimed = self._claimed, True
        return not claimed

    def run(self) -> None:
        try:
            with torch.inference_mode(self.inference):
                self.result = F.scaled_dot_product_attention(*self.args)
        except BaseException as error:  # handed to the caller, which raises it
            self.error = error
        finally:
            self.args = ()
            self.done.set()

    def finish(self) -> torch.Tensor:
        """The caller's side: run the job here if the helper has not claimed it, else wait for the helper."""
        if self.claim():
            self.run()
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class PairAttention:
    """`scaled_dot_product_attention` with the batch split between the calling thread and one helper thread,
    started at the first call. One helper serves every caller in the process (`shared`; jobs queue up)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._starting = threading.Lock()
        self._thread: tp.Optional[threading.Thread] = None

    @staticmethod
    def wanted(q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether splitting pays: a batch to split, a long context ("b h t d" layout), and a caller on one torch
        thread (with more, as app/threads.py gives a generation on cores no other process uses, they split it)."""
        return q.shape[0] >= 2 and k.shape[2] >= MIN_KEYS and torch.get_num_threads() == 1

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        half = q.shape[0] // 2
        job = _Job(q[half:], k[half:], v[half:])
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="pair-attention", daemon=True)
                self._thread.start()
        self._jobs.put(job)
        first = F.scaled_dot_product_attention(q[:half], k[:half], v[:half])
        return torch.cat([first, job.finish()])

    def _serve(self) -> None:
        torch.set_num_threads(1)  # a new thread would otherwise start torch's default team (every core)
        while True:
            job = self._jobs.get()
            if job.claim():
                job.run()


@functools.cache
def shared() -> PairAttention:
    """The process's one helper."""
    return PairAttention()
