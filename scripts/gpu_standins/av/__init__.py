"""Stand-in for PyAV (scripts/gpu_check): audiocraft imports it to read audio files, generation never does."""

__version__ = "0.0.0+gpu-check-stand-in"
STAND_IN = True


def open(*args: object, **kwargs: object) -> None:  # noqa: A001 (PyAV's name)
    raise RuntimeError("PyAV is a stand-in here (scripts/gpu_check): reading audio files needs the real package")
