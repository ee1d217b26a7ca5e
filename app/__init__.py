"""Text-to-music over HTTP: MusicGen behind a Flask API that streams progress as Server-Sent Events."""

import functools
import logging
import typing as tp

from flask import Flask

from . import threads
from .config import Settings
from .errors import register_error_handlers
from .generation import GenerationService, Model


def create_app(settings: tp.Optional[Settings] = None,
               load_model: tp.Optional[tp.Callable[[], Model]] = None) -> Flask:
    """Build the app and start its generation thread, which loads the model.

    Runs in the gunicorn worker (no preload), never at import: the model belongs to the process
    that serves it, not to the master.

    Args:
        settings: defaults to `Settings.from_env()`.
        load_model: defaults to loading `settings.model`; tests pass a fake.
    """
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, SETTINGS=settings)
    _configure_logging(settings.log_level)

    if load_model is None:
        from .model import MusicModel
        load_model = functools.partial(MusicModel.from_settings, settings)
    service = GenerationService(load_model, settings.normalize, settings.idle_unload_seconds,
                                threads.CpuThreads(settings.cpu_threads))
    from . import api, auth, cors, metrics, web
    metrics.install(app, service)  # before start: the worker reports every job to it
    app.extensions["musicgen"] = service.start()

    app.register_blueprint(api.bp)
    app.register_blueprint(web.bp)
    cors.install(app, settings.allowed_origins)  # before auth: a preflight is answered before any token check
    auth.install(app, settings.auth_token)
    register_error_handlers(app)
    return app


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:  # under gunicorn nothing has configured the root logger yet
        logging.basicConfig(format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    root.setLevel(level.upper())
