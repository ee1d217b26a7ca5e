"""Prometheus metrics at GET /metrics, one registry per app (so several apps in one process never collide).

Generation outcomes come from the worker (`GenerationService.on_finish`); answers refused before a
stream starts (invalid, unauthorized, busy) from the response status. Scrape every instance directly:
each process has its own model, slot and numbers.
"""

import time
import typing as tp

import torch
from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .generation import GenerationService, Job

OUTCOMES = ("completed", "error", "cancelled", "busy", "invalid", "unauthorized")
STATES = ("loading", "ready", "busy", "failed")
GENERATE_ENDPOINT = "api.generate_music"


class Metrics:
    def __init__(self, service: GenerationService):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("musicgen_requests", "Generation requests by outcome.", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(outcome)
        self.generation_seconds = Histogram(
            "musicgen_generation_seconds", "Wall time of completed generations (model work, without the WAV).",
            buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600), registry=self.registry)
        self.audio_seconds = Counter("musicgen_audio_seconds", "Seconds of audio generated.", registry=self.registry)
        self.steps_per_second = Gauge("musicgen_decoding_steps_per_second",
                                      "LM decoding steps per second of the last completed generation.",
                                      registry=self.registry)
        self.registry.register(ServiceCollector(service))

    def job_finished(self, job: Job, outcome: str) -> None:
        """The worker's hook: one call per job that held the slot."""
        self.requests.labels(outcome).inc()
        if outcome == "completed":
            self.generation_seconds.observe(job.seconds)
            self.audio_seconds.inc(job.params.duration)
            if job.seconds > 0:
                self.steps_per_second.set(job.lm_steps / job.seconds)

    def refused(self, response: Response) -> Response:
        """after_request: count generation requests answered before any stream (the 200s count when done)."""
        # POST only: a CORS preflight (OPTIONS) to the same endpoint is not a generation request.
        if request.endpoint == GENERATE_ENDPOINT and request.method == "POST" and response.status_code != 200:
            status = response.status_code
            if status == 401:
                outcome = "unauthorized"
            elif status == 503 and "Retry-After" in response.headers:  # Busy; a failed model has no Retry-After
                outcome = "busy"
            elif 400 <= status < 500:
                outcome = "invalid"
            else:
                outcome = "error"
            self.requests.labels(outcome).inc()
        return response

    def view(self) -> Response:
        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)


class ServiceCollector(Collector):
    """Values read at scrape time: state, uptime and, on CUDA, GPU memory."""

    def __init__(self, service: GenerationService):
        self.service = service

    def collect(self) -> tp.Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily("musicgen_state", "1 for the current state of the service.", labels=["state"])
        current = self.service.state
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield GaugeMetricFamily("musicgen_model_loaded", "1 while the model is in memory.",
                                value=1.0 if self.service.model is not None else 0.0)
        yield GaugeMetricFamily("musicgen_uptime_seconds", "Seconds since the app started.",
                                value=time.time() - self.service.started_at)
        if torch.cuda.is_initialized():  # only once the model is on a GPU: never initialise CUDA from here
            yield GaugeMetricFamily("musicgen_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                                    value=float(torch.cuda.memory_allocated()))
            yield GaugeMetricFamily("musicgen_gpu_memory_reserved_bytes", "GPU memory held by PyTorch's allocator.",
                                    value=float(torch.cuda.memory_reserved()))


def install(app: Flask, service: GenerationService) -> Metrics:
    metrics = Metrics(service)
    service.on_finish = metrics.job_finished
    app.after_request(metrics.refused)
    app.add_url_rule("/metrics", "metrics", metrics.view, methods=["GET"])
    app.extensions["musicgen_metrics"] = metrics
    return metrics
