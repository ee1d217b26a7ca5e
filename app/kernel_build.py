"""How this service's C++ kernels (app/csrc/) are built and loaded: at first use, on CPUs with AVX512-VNNI.

torch's C++ extension builder (g++ and ninja; ninja comes with the lock) compiles them, one extension, once into
torch's extension cache (`$TORCH_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/torch_extensions`: the systemd unit's
/var/cache/musicgen), ~40 s the first time, and loads it from there afterwards; a changed source or header is
rebuilt. Where the CPU lacks AVX512-VNNI, or the build fails (no compiler), `build` says why in the log and returns
None, and the caller keeps torch's own kernels (app/int8_kernel.py, app/half_attention.py, app/lean_step.py).
"""

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import types
import typing as tp
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
NAME = "musicgen_kernels"

# AVX512 for these files only (`build` checks the CPU before anything in them runs); OpenMP, which torch's
# `at::parallel_for` needs to spread a kernel's work over torch's threads (without it, it runs on one).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c", "-fopenmp"]


def supported() -> bool:
    """Whether this CPU runs the kernels: AVX512 (F, BW, VL, DQ, as torch's own AVX512 kernels) with VNNI."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and torch._C._cpu._is_avx512_vnni_supported()


def build(what: str, instead: str) -> tp.Optional[types.ModuleType]:
    """This service's C++ kernels (app/csrc/), built or loaded from torch's extension cache; None, with the reason in
    the log (`what` runs on `instead`), where this CPU or machine cannot have them."""
    if not supported():
        log.info("%s: %s (this CPU has no AVX512-VNNI for this service's own kernel)", what, instead)
        return None
    module, error = _built()
    if module is None:
        log.warning("%s: %s (this service's own kernel did not build: %s)", what, instead, error)
        return None
    log.info("%s: this service's kernel", what)
    return module


@functools.cache
def _built() -> tp.Tuple[tp.Optional[types.ModuleType], str]:
    """The extension, or None and why not (built once a process; torch's builder rebuilds what changed)."""
    from torch.utils import cpp_extension  # imported here: it looks for CUDA and a compiler at import

    log.info("this service's C++ kernels: loading them from torch's extension cache (a first build: ~40 s)")
    sources = sorted(str(path) for path in CSRC.glob("*.cpp"))
    # torch's builder rebuilds when a source or a flag changes, not a header: the headers' digest is a flag.
    headers = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
    try:
        with _ninja_on_path():
            module = cpp_extension.load(NAME, sources, extra_cflags=FLAGS + [f"-DMUSICGEN_HEADERS=0x{headers}"],
                                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: any of them means the fallback
        message = str(error).strip()
        return None, message.splitlines()[-1] if message else type(error).__name__
    return module, ""


@contextlib.contextmanager
def _ninja_on_path() -> tp.Iterator[None]:
    """torch's builder runs `ninja` from PATH; a service started by systemd may not have the venv's bin on it."""
    if shutil.which("ninja"):
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before
