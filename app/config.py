"""Every setting of the service: its environment variable, its default and why.

Settings are read once, when the app is created in the worker process, and validated then, so a
typo fails the start-up with a message instead of the first request. gunicorn's own settings
(HOST, PORT, threads, timeouts) live in `scripts/gunicorn.conf.py`.
"""

import dataclasses
import os
import re
import typing as tp

NORMALIZATIONS = ("loudness", "peak", "rms", "clip")
PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "int8-dynamic")
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#*\s]+", re.IGNORECASE)  # what a browser sends in `Origin`
DECODER_PRECISIONS = ("auto", "fp32", "bf16")
TYPE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")  # module.Type


class ConfigError(ValueError):
    """A setting has a value the service cannot work with."""


@dataclasses.dataclass(frozen=True)
class Settings:
    # MUSICGEN_MODEL: a Hugging Face id (facebook/musicgen-small, facebook/musicgen-stereo-medium, ...),
    # a local directory holding state_dict.bin + compression_state_dict.bin, or a tiny random-weight model:
    # debug, debug-stereo, debug-melody, debug-stereo-melody, debug-small (app/debug_models.py).
    model: str = "facebook/musicgen-small"
    # MUSICGEN_DEVICE: auto (cuda when available, else cpu), cpu, cuda or cuda:N.
    device: str = "auto"
    # MUSICGEN_MBD_MODEL: where MultiBand Diffusion comes from: a Hugging Face id, a directory holding
    # mbd_musicgen_32khz.th, the file itself, or `debug`. Empty: `debug` for the debug models, else the
    # official facebook/multiband-diffusion.
    mbd_model: str = ""
    # MUSICGEN_MBD_PRELOAD: load MBD at start-up (1) instead of on the first `mbd: true` request (0).
    mbd_preload: bool = False
    # MUSICGEN_KEEPALIVE_SECONDS: an SSE comment is written after this long without any other message.
    # A vanished client is noticed at the second write after it left, so detection takes at most 2x this.
    keepalive_seconds: float = 0.5
    # MUSICGEN_MAX_BODY_BYTES: larger request bodies get 413 (keep nginx's client_max_body_size equal).
    # 16 MiB holds a melody and a prompt as audio files in base64 (60 s of 48 kHz stereo 16-bit WAV alone).
    max_body_bytes: int = 16 * 1024 * 1024
    # MUSICGEN_NORMALIZE: loudness (audiocraft's demo: -16 dB LUFS target with soft clipping),
    # peak, rms, or clip (the model's raw output, hard-limited to [-1, 1]).
    normalize: str = "loudness"
    # MUSICGEN_RETRY_AFTER_SECONDS: the Retry-After header of a busy 503.
    retry_after_seconds: int = 5
    # MUSICGEN_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    # MUSICGEN_IDLE_UNLOAD_SECONDS: after this many seconds without a generation the model leaves the GPU
    # (its memory is free for other work) and the next request loads it again; its `start` event waits for
    # that, with keep-alives meanwhile. 0: never unload.
    idle_unload_seconds: float = 0.0
    # MUSICGEN_AUTH_TOKEN: when set, POST /api/v1/generate_music needs `Authorization: Bearer <token>` and
    # answers 401 otherwise. Empty: no authentication, as the original clients expect.
    auth_token: str = dataclasses.field(default="", repr=False)  # kept out of logs
    # MUSICGEN_PRECISION: the LM's precision on CPU: auto (int8-dynamic where the CPU has VNNI, else bf16 where
    # it has native bf16, else fp32), fp32 (stock), bf16, bf16-autocast or int8-dynamic (app/precision.py).
    # CUDA keeps audiocraft's fp16.
    precision: str = "auto"
    # MUSICGEN_CROSS_KV_CACHE: project the text conditioning to cross-attention keys/values once per
    # generation instead of at every step of every layer (same tokens as stock; 0 restores stock). CPU only.
    cross_kv_cache: bool = True
    # MUSICGEN_STATIC_KV_CACHE: write self-attention keys/values into a buffer sized for the whole
    # generation instead of growing them with torch.cat every step (same tokens as stock). CPU only.
    static_kv_cache: bool = True
    # MUSICGEN_PACKED_WEIGHTS: reorder the LM's weights once into oneDNN's packed layout, which a decoding step
    # reads about twice as fast (logits within float rounding of stock; the LM can then only generate). CPU only.
    packed_weights: bool = True
    # MUSICGEN_CORS_ORIGINS: the origins (scheme://host[:port]) whose web pages may call the API from a browser,
    # separated by commas or spaces; `*` (default): any origin, without credentials. Others get no CORS headers.
    cors_origins: str = "*"
    # MUSICGEN_CPU_THREADS: torch's CPU threads for a generation, set on the generation thread (app/threads.py).
    # 0 by default: every core this process may use while no other process uses them, one thread while one does;
    # a count: always that many.
    cpu_threads: int = 0
    # MUSICGEN_DECODER_PRECISION: the EnCodec decoder's precision on CPU: auto (bf16 where the CPU has native bf16,
    # else fp32), fp32 or bf16 (app/codec.py). CUDA keeps fp32.
    decoder_precision: str = "auto"
    # MUSICGEN_CUDA_GRAPH: on CUDA, decode over fixed buffers (static self-attention cache, cross-attention
    # keys/values once per generation, fp16 matrix weights) and replay each decoding step, sampling included,
    # as one CUDA graph (app/cuda_graph.py). Opt-in until a GPU run of scripts/gpu_check has checked it.
    cuda_graph: bool = False
    # MUSICGEN_TRUSTED_CHECKPOINT_TYPES: comma-separated fully qualified types (e.g. pathlib.PosixPath) that the
    # checkpoints may unpickle besides tensors, plain types and omegaconf's config types. Empty by default. Risk:
    # a checkpoint can then build objects of these types with arguments of its choosing, so name only types you
    # know, for files you trust (a load error names the type a checkpoint needs).
    trusted_checkpoint_types: str = ""
    # MUSICGEN_PARALLEL_ATTENTION: on CPU, once the context passes 256 steps, the CFG batch's two halves attend over
    # the KV cache at once, the second on a helper thread (app/pair_attention.py): bit-identical, 0.95-1.13x per step
    # at 600 steps and 1.17-1.25x at 1400 (paired; up to ~10 % slower while other processes hold both cores), where a
    # generation runs one torch thread (MUSICGEN_CPU_THREADS 1, or 0 while other processes use the cores) and this
    # process may use two cores or more, over an fp32 key/value cache (MUSICGEN_HALF_KV_CACHE=0, or where the fp16
    # cache's kernel does not build). 0: one core for everything.
    parallel_attention: bool = True
    # MUSICGEN_INT8_KERNEL: with int8-dynamic, the products on this service's AVX512-VNNI kernel (app/int8_kernel.py,
    # built with g++ at the first load and cached; 1.12-1.15x fbgemm's per step in the benchmarks) where the CPU has
    # it and it builds, else on fbgemm's kernels; 0: always fbgemm's.
    int8_kernel: bool = True
    # MUSICGEN_HALF_KV_CACHE: on CPU, the self-attention key/value cache in fp16, attended over by this service's own
    # kernel (app/half_attention.py; built like the int8 kernel, where the CPU has AVX512-VNNI): half the bytes a
    # step reads past a few hundred steps of context. Changes the numbers a little (11 significant bits per key and
    # value; next-token distributions within a KL of ~2e-5 of the fp32 cache's); 0: fp32. With both kernels each
    # layer's decoding step is one C++ call (app/lean_step.py's whole-layer step); either setting at 0 turns it off.
    half_kv_cache: bool = True
    # MUSICGEN_INT8_KV_CACHE: where that cache is in fp16, keep it in int8 instead, a scale per key and per value
    # (app/int8_kv_cache.py, read by the same kernel): half its bytes again, 1.08-1.09x / 1.13-1.14x per step at
    # 750 / 1400 steps of context on two cores, on a par at short ones; next-token distributions a little further
    # from the fp32 cache's than fp16's (KL 0.0066 against 0.0063 on peaked ones in the benchmark). 0: the fp16 cache.
    int8_kv_cache: bool = True

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("MUSICGEN_MODEL is empty")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"MUSICGEN_DEVICE={self.device!r}: use auto, cpu, cuda or cuda:N")
        if not 0.05 <= self.keepalive_seconds <= 60:
            raise ConfigError("MUSICGEN_KEEPALIVE_SECONDS must be between 0.05 and 60")
        if self.max_body_bytes < 1024:
            raise ConfigError("MUSICGEN_MAX_BODY_BYTES must be at least 1024")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"MUSICGEN_NORMALIZE={self.normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
        if self.idle_unload_seconds < 0:
            raise ConfigError("MUSICGEN_IDLE_UNLOAD_SECONDS must be 0 (never) or more")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"MUSICGEN_PRECISION={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.decoder_precision not in DECODER_PRECISIONS:
            raise ConfigError(f"MUSICGEN_DECODER_PRECISION={self.decoder_precision!r}: use one of "
                              f"{', '.join(DECODER_PRECISIONS)}")
        if self.cpu_threads < 0:
            raise ConfigError("MUSICGEN_CPU_THREADS must be 0 (every core this process may use while no other "
                              "process uses them) or a count of threads")
        if any(not TYPE_NAME.match(name) for name in self.trusted_types):
            raise ConfigError(f"MUSICGEN_TRUSTED_CHECKPOINT_TYPES={self.trusted_checkpoint_types!r}: "
                              "use fully qualified names separated by commas, e.g. pathlib.PosixPath")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"MUSICGEN_LOG_LEVEL={self.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
        _check_origins(self.allowed_origins)

    @property
    def trusted_types(self) -> tp.Tuple[str, ...]:
        return tuple(name.strip() for name in self.trusted_checkpoint_types.split(",") if name.strip())

    @property
    def mbd_source(self) -> str:
        """Where MBD weights come from, with the empty default resolved."""
        if self.mbd_model:
            return self.mbd_model
        return "debug" if self.model.startswith("debug") else "facebook/multiband-diffusion"

    @property
    def allowed_origins(self) -> tp.Tuple[str, ...]:
        """MUSICGEN_CORS_ORIGINS as a tuple: ("*",) or the listed origins."""
        return tuple(self.cors_origins.replace(",", " ").split())

    @classmethod
    def from_env(cls, environ: tp.Mapping[str, str] = os.environ) -> "Settings":
        """Read every MUSICGEN_* variable; unset ones keep their defaults."""
        values: tp.Dict[str, tp.Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"MUSICGEN_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        return cls(**values)


def _convert(name: str, kind: tp.Any, raw: str) -> tp.Any:
    variable = f"MUSICGEN_{name.upper()}"
    try:
        if kind in (bool, "bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return raw


def _check_origins(origins: tp.Tuple[str, ...]) -> None:
    if not origins:
        raise ConfigError("MUSICGEN_CORS_ORIGINS is empty: use * or a list of origins")
    if origins != ("*",):
        for origin in origins:
            if not ORIGIN.fullmatch(origin):
                raise ConfigError(f"MUSICGEN_CORS_ORIGINS: {origin!r} is not an origin: use scheme://host[:port] "
                                  "(no path, no trailing slash), or * alone for any origin")
