"""gunicorn settings for the music service: one worker, several threads, no preload.

One worker because each worker process loads its own copy of the model onto the GPU and the API
allows one generation per process; threads serve health checks, busy answers and the stream.
Several GPUs: run one instance per GPU (deploy/), each with its own PORT and CUDA_VISIBLE_DEVICES.
"""

import os
import signal

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '5555')}"
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
preload_app = False  # the model is loaded in the worker by its generation thread, never in the master
# A worker that misses heartbeats this long is killed; gthread's main loop keeps beating while
# threads stream, so this does not limit how long a generation may take.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
# On SIGTERM a running generation gets this long to finish (a 60 s clip with MBD on a GPU fits).
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "180"))
keepalive = 5
# gunicorn 27 opens a control socket at ~/.gunicorn/gunicorn.ctl, shared by every instance of the
# same user; the service does not use it.
control_socket_disable = True
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("MUSICGEN_LOG_LEVEL", "info").lower()


def post_worker_init(worker):
    """On SIGTERM gunicorn lets running requests finish for `graceful_timeout`, then kills the worker:
    tell the app first, so that a generation that would not make it ends with an error event its client
    can still read ("the server is shutting down") instead of a cut stream, and new requests get 503."""
    service = getattr(worker.wsgi, "extensions", {}).get("musicgen")
    if service is None:
        return
    stop = worker.handle_exit

    def handle_exit(sig, frame):
        service.shutdown(worker.cfg.graceful_timeout)
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn set it: the signal does not break system calls
