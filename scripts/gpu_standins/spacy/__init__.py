"""Stand-in for spaCy (scripts/gpu_check): audiocraft imports it, MusicGen's tokenizers never use it."""

import types

__version__ = "0.0.0+gpu-check-stand-in"
STAND_IN = True
MESSAGE = "spaCy is a stand-in here (scripts/gpu_check): the whitespace tokenizer needs the real package"


def load(name: str, *args: object, **kwargs: object) -> None:
    raise OSError(MESSAGE)


def _download(*args: object, **kwargs: object) -> None:
    raise RuntimeError(MESSAGE)


cli = types.SimpleNamespace(download=_download)
