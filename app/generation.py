"""The generation slot: one lock, one long-lived worker thread, one event queue per job.

The request thread takes the lock without blocking (busy -> 503) and hands a `Job` to the worker;
the worker runs it and fills the job's queue with `start`, `progress` (with `stream_audio`, `audio` too) and
exactly one terminal event; the response streams that queue. Every job runs on the same thread: PyTorch's CPU
thread pools belong to the thread that first used them, and a fresh thread per job ran 2.5-3x slower.
"""

import base64
import dataclasses
import gc
import itertools
import logging
import queue
import secrets
import threading
import time
import typing as tp

import torch

from . import threads
from .audio import encode, pcm16
from .params import MAX_SEED, AudioClip, GenerationParams, UnsupportedRequest
from .weights import ModelLoadError

log = logging.getLogger(__name__)

# The share of the progress bar each stage fills. The LM dominates; EnCodec decoding is one fast
# call; diffusion makes 20 U-Net passes per band over the whole clip.
SHARES = {"lm": 0.97, "decode": 0.03}
SHARES_MBD = {"lm": 0.70, "decode": 0.02, "diffusion": 0.28}
# Streaming audio decodes during the LM's steps: the final decode is only the clip's last second.
SHARES_STREAM = {"lm": 0.99, "decode": 0.01}
MIN_PROGRESS_INTERVAL = 0.05  # seconds: at most ~20 progress events a second
BUSY = "another generation is running; try again later"


class Busy(Exception):
    """Another generation holds the slot, or the server is stopping: refused, not queued; try again later."""


class ModelUnavailable(Exception):
    """The model failed to load; trying this server again will not help."""


class Cancelled(Exception):
    """Raised inside a generation when its client went away or the server is stopping."""


class Model(tp.Protocol):
    """What the worker needs of a model (`app.model.MusicModel`; tests also use a fake)."""

    name: str
    device: str
    sample_rate: int
    channels: int
    melody: bool  # the model follows a melody
    streams: bool  # the model can stream its audio while it is made (`generate`'s `on_audio`)

    def check(self, params: GenerationParams) -> None: ...
    def ensure_mbd(self) -> tp.Any: ...
    def lm_steps(self, duration: float, prompt: tp.Optional[AudioClip] = None) -> int: ...
    def diffusion_steps(self) -> int: ...
    def generate(self, params: GenerationParams, seed: int, on_step: tp.Callable[[str], None],
                 on_audio: tp.Optional[tp.Callable[[torch.Tensor, int], None]] = None,
                 level: str = "loudness") -> torch.Tensor: ...


@dataclasses.dataclass(eq=False)
class Job:
    """One accepted request. It holds the slot until it ends or, if it never began, until its client leaves."""

    params: GenerationParams
    seed: int
    free_slot: tp.Callable[[], None]
    events: "queue.Queue[tp.Dict[str, tp.Any]]" = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    _state: str = "queued"  # queued -> running -> done, or queued -> abandoned
    _guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    reason: str = "the client went away"
    lm_steps: int = 0  # for the metrics, once generated
    seconds: float = 0.0
    _ended: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def cancel(self, reason: str = "") -> None:
        """Called when the response is closed (the client went away, or the stream ended anyway) or on shutdown."""
        if reason and not self.cancelled.is_set():
            self.reason = reason
        self.cancelled.set()
        with self._guard:
            abandoned = self._state == "queued"
            if abandoned:
                self._state = "abandoned"
        if abandoned:  # nobody will run it: free the slot now, not after a model load it waits behind
            self.free_slot()

    def begin(self) -> bool:
        """The worker takes the job; False if its client already left."""
        with self._guard:
            if self._state == "abandoned":
                return False
            self._state = "running"
            return True

    def finish(self) -> None:
        """Free the slot of a running job (once; later calls do nothing)."""
        with self._guard:
            if self._state != "running":
                return
            self._state = "done"
        self.free_slot()

    def end(self, event: tp.Dict[str, tp.Any]) -> None:
        """Queue the terminal event; only the first one counts (shutdown may end a job the worker still runs)."""
        if self._ended.acquire(blocking=False):
            self.events.put(event)


class Progress:
    """Progress over the whole job, 0-100 and never backwards, thinned out to what a client needs."""

    def __init__(self, totals: tp.Mapping[str, int], shares: tp.Mapping[str, float],
                 clock: tp.Callable[[], float] = time.monotonic):
        self.totals = {stage: max(1, totals[stage]) for stage in shares}
        self.shares = shares
        self.done = dict.fromkeys(shares, 0)
        self.clock = clock
        self.sent = 0.0
        self.sent_at = -1.0

    def step(self, stage: str) -> tp.Optional[float]:
        """Count one step of `stage`; return the percentage to report, or None to stay quiet."""
        self.done[stage] = min(self.done[stage] + 1, self.totals[stage])
        percent = round(100 * sum(self.shares[s] * self.done[s] / self.totals[s] for s in self.shares), 2)
        now = self.clock()
        finished = percent >= 100
        # One event per whole percent, but not more than ~20 a second (the end always goes out).
        if percent > self.sent and (int(percent) > int(self.sent) or finished) and (
                finished or now - self.sent_at >= MIN_PROGRESS_INTERVAL):
            self.sent, self.sent_at = min(percent, 100.0), now
            return self.sent
        return None


class GenerationService:
    """One generation at a time, on one long-lived thread that also loads the model."""

    def __init__(self, load_model: tp.Callable[[], Model], normalize: str = "loudness",
                 idle_unload_seconds: float = 0.0, cpu_threads: tp.Optional[threads.CpuThreads] = None):
        self._load_model = load_model
        self._cpu_threads = cpu_threads  # MUSICGEN_CPU_THREADS, set on the generation thread; None: torch's own
        self._normalize = normalize
        self._idle_unload = idle_unload_seconds
        self._unloaded = False  # the model was unloaded for idleness; the next job loads it again
        self._stopping = False
        self.current: tp.Optional[Job] = None  # the job that took the slot last
        self.on_finish: tp.Callable[[Job, str], None] = lambda job, outcome: None  # app.metrics
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tp.Optional[Job]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.model: tp.Optional[Model] = None
        self.load_error: tp.Optional[str] = None
        self.started_at = time.time()

    def start(self) -> "GenerationService":
        self._thread.start()
        return self

    @property
    def state(self) -> str:
        """loading, ready, busy or failed."""
        if self.load_error is not None:
            return "failed"
        if self._lock.locked():
            return "busy"
        return "ready" if self.model is not None or self._unloaded else "loading"

    def submit(self, params: GenerationParams) -> Job:
        """Take the slot and queue the job, or raise at once: nothing waits for the lock.

        What the loaded model cannot do (`UnsupportedRequest`) is refused here, before the slot is taken;
        while the model loads, the worker checks it and ends the stream with an error event instead.
        """
        self.check_available()
        model = self.model
        if model is not None:
            model.check(params)
        if not self._lock.acquire(blocking=False):
            raise Busy(BUSY)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        job = self.current = Job(params, seed, self._lock.release)
        self._jobs.put(job)
        return job

    def check_available(self) -> None:
        """Raise what `submit` would refuse a job with now, without taking the slot: the edge asks before work
        that a busy server would waste (decoding audio inputs)."""
        if self.load_error is not None:
            raise ModelUnavailable(f"the model failed to load: {self.load_error}")
        if self._stopping:
            raise Busy("the server is shutting down; try again later")
        if self._lock.locked():
            raise Busy(BUSY)

    def shutdown(self, grace_seconds: float) -> None:
        """SIGTERM (scripts/gunicorn.conf.py): refuse new jobs, and end a job that has not finished shortly
        before `grace_seconds` with an error event, while its client can still read it."""
        self._stopping = True
        timer = threading.Timer(max(0.0, grace_seconds - min(2.0, grace_seconds / 2)), self._stop_current)
        timer.daemon = True
        timer.start()

    def _stop_current(self) -> None:
        job = self.current
        if job is not None:  # one that already ended ignores both calls
            job.cancel("the server is shutting down")
            job.end({"event": "error", "message": "generation cancelled: the server is shutting down"})

    def stop(self) -> None:
        """Let the worker finish its current job and end (tests; the process exit ends it anyway)."""
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._cpu_threads is not None:  # torch's thread count belongs to the thread that sets it: this one
            self._cpu_threads.apply()
        try:
            self.model = self._load_model()
        except Exception as e:
            log.error("%s", e)
            log.debug("model load failure", exc_info=True)
            self.load_error = str(e)
        while True:
            try:  # an idle model is unloaded on this thread, the one that loads and runs it
                job = self._jobs.get(timeout=self._idle_unload if self._idle_unload and self.model else None)
            except queue.Empty:
                self._unload()
                continue
            if job is None:
                return
            self._execute(job)

    def _unload(self) -> None:
        if self.model is None or self._lock.locked():
            return
        log.info("unloading the model after %g s without requests", self._idle_unload)
        self.model, self._unloaded = None, True
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _execute(self, job: Job) -> None:
        try:
            self._prepare(job)
            failure: tp.Optional[Exception] = None
        except Exception as e:
            failure = e
        if not job.begin():
            log.info("generation cancelled: the client went away before it started")
            self.on_finish(job, "cancelled")
            return

        terminal: tp.Dict[str, tp.Any] = {"event": "error", "message": "generation failed"}
        outcome = "error"
        try:
            if failure is not None:
                raise failure
            wav = self._generate(job)
            # The GPU is done: free the slot before the terminal event, so a client that asks again
            # the instant it reads `completed` is never refused.
            job.finish()
            params = job.params
            audio = encode(wav, self.model.sample_rate, params.output_format, self._normalization(params))
            extra = {"format": params.output_format} if params.uses_audio_features else {}
            terminal = {"event": "completed", **self._describe(job), **extra, "audio": base64.b64encode(audio).decode()}
            outcome = "completed"
        except Cancelled as e:
            log.info("generation cancelled: %s", e)
            terminal = {"event": "error", "message": f"generation cancelled: {e}"}
            outcome = "cancelled"
        except (ModelUnavailable, ModelLoadError, UnsupportedRequest) as e:  # no model, MBD not loaded, or the
            terminal = {"event": "error", "message": str(e)}  # model (loaded after the request came) can't do it
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory", exc_info=True)
            terminal = {"event": "error", "message": "out of GPU memory; try a shorter duration"}
        except Exception as e:
            log.exception("generation failed")
            terminal = {"event": "error", "message": f"generation failed: {type(e).__name__}"}
        finally:
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            job.finish()
            job.end(terminal)
            self.on_finish(job, outcome)

    def _prepare(self, job: Job) -> None:
        """Load what the job needs (MBD on first use) before it begins: loading cannot be interrupted,
        but a client that leaves meanwhile frees the slot at once (see `Job.cancel`)."""
        if self.model is None and self._unloaded and not job.cancelled.is_set():  # after an idle unload
            log.info("loading the model again for a request")
            self.model, self._unloaded = self._load_model(), False
        if self.model is None:
            raise ModelUnavailable(f"the model failed to load: {self.load_error}")
        self.model.check(job.params)  # again: the model may have loaded after `submit`
        if job.params.mbd and not job.cancelled.is_set():
            self.model.ensure_mbd()

    def _generate(self, job: Job) -> torch.Tensor:
        assert self.model is not None
        model, params = self.model, job.params
        job.events.put({"event": "start", "model": model.name, **self._describe(job), "mbd": params.mbd,
                        **self._inputs(params)})
        totals = {"lm": model.lm_steps(params.duration, params.audio_prompt), "decode": 1}
        if params.mbd:
            totals["diffusion"] = model.diffusion_steps()
        progress = Progress(totals, SHARES_MBD if params.mbd else SHARES_STREAM if params.stream_audio else SHARES)

        def on_step(stage: str) -> None:
            if self._cpu_threads is not None:
                self._cpu_threads.on_step(stage)
            if stage == "layer":  # inside an LM step: its threads only; a step is what cancels and counts
                return
            if job.cancelled.is_set():
                raise Cancelled(job.reason)
            percent = progress.step(stage)
            if percent is not None:
                job.events.put({"event": "progress", "progress": percent})

        started = time.monotonic()
        if self._cpu_threads is not None:
            self._cpu_threads.begin(on_cpu=model.device == "cpu")
        # Only a streamed job passes the streaming arguments: a model without streaming never sees them.
        stream = {"on_audio": self._audio_events(job), "level": self._normalization(params)} \
            if params.stream_audio else {}
        wav = model.generate(params, job.seed, on_step, **stream)
        job.lm_steps, job.seconds = totals["lm"], time.monotonic() - started
        log.info("generated %d s (mbd=%s, seed=%d) in %.1f s", params.duration, params.mbd, job.seed, job.seconds)
        return wav

    def _audio_events(self, job: Job) -> tp.Callable[[torch.Tensor, int], None]:
        """`on_audio` for a job: each chunk becomes an `audio` event, queued like progress (the queue never blocks
        this thread, however slowly the client reads)."""
        rate, numbers = self.model.sample_rate, itertools.count()

        def on_audio(chunk: torch.Tensor, start: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled(job.reason)
            job.events.put({"event": "audio", "seq": next(numbers), "start": start / rate,
                            "pcm": base64.b64encode(pcm16(chunk)).decode()})
        return on_audio

    def _normalization(self, params: GenerationParams) -> str:
        return params.normalization or self._normalize

    def _inputs(self, params: GenerationParams) -> tp.Dict[str, tp.Any]:
        """What `start` says of the version 1.1 fields; nothing for a request without them (as in 1.0)."""
        if not params.uses_audio_features:
            return {}
        clips = {"melody": params.melody, "audio_prompt": params.audio_prompt}
        return {"format": params.output_format, "normalization": self._normalization(params),
                "stream_audio": bool(params.stream_audio),
                **{name: None if clip is None else {"seconds": round(clip.seconds, 3)} for name, clip in clips.items()}}

    def _describe(self, job: Job) -> tp.Dict[str, tp.Any]:
        assert self.model is not None
        return {"sample_rate": self.model.sample_rate, "channels": self.model.channels,
                "duration": job.params.duration, "seed": job.seed}
