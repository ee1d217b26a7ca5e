"""Stand-in for xformers (scripts/gpu_check): only what audiocraft's torch attention backend touches."""

__version__ = "0.0.0+gpu-check-stand-in"
STAND_IN = True
