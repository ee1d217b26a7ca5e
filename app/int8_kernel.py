"""This service's int8 product kernel for AVX512-VNNI CPUs (app/csrc/int8_linear.cpp), built at first use.

A decoding step's int8 products are reads of the weights: fbgemm's kernels (PyTorch's dynamic quantization) read
them at ~20 GB/s on one Zen 4 core, this kernel at ~24 GB/s (~32 GB/s on two cores, against ~25 for fbgemm), the
same maths (int8 weights with a scale per output row, 8-bit activations with one scale per call, exact integer
sums). `fast_lm.Int8Linear` uses it where `load()` gives it, and fbgemm's kernels otherwise.

The kernel is compiled once by torch's C++ extension builder (g++ and ninja; ninja comes with the lock) into
torch's extension cache (`$TORCH_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/torch_extensions`: the systemd unit's
/var/cache/musicgen), ~20 s the first time, and loaded from there afterwards. Where the CPU lacks AVX512-VNNI,
or the build fails (no compiler), `load()` says why in the log and returns None. `build` does the same for the
service's other C++ kernel (app/half_attention.py's).
"""

import contextlib
import functools
import logging
import os
import shutil
import types
import typing as tp
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "int8_linear.cpp"
NAME = "musicgen_int8_linear"
# AVX512 for this file only (`load` checks the CPU before anything in it runs); OpenMP, which torch's
# `at::parallel_for` needs to spread the groups of columns over torch's threads (without it they run on one).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c", "-fopenmp"]
# The kernel's 32-bit sums hold 255 x 127 x this many inputs without overflow.
MAX_INPUTS = 32768


def supported() -> bool:
    """Whether this CPU runs the kernel: AVX512 (F, BW, VL, DQ, as torch's own AVX512 kernels) with VNNI."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and torch._C._cpu._is_avx512_vnni_supported()


@functools.cache
def load() -> tp.Optional[types.ModuleType]:
    """The built kernel (functions `pack` and `linear`), or None where this CPU or machine cannot have it."""
    module = build(NAME, SOURCE, "int8 products", "fbgemm's kernels")
    if module is not None and not _works(module):
        log.warning("int8 products: fbgemm's kernels (this service's own gave wrong products in a trial)")
        return None
    return module


def build(name: str, source: Path, what: str, instead: str) -> tp.Optional[types.ModuleType]:
    """One of this service's C++ kernels (app/csrc/), built or loaded from torch's extension cache; None, with the
    reason in the log (`what` runs on `instead`), where this CPU or machine cannot have it."""
    if not supported():
        log.info("%s: %s (this CPU has no AVX512-VNNI for this service's own kernel)", what, instead)
        return None
    from torch.utils import cpp_extension  # imported here: it looks for CUDA and a compiler at import

    log.info("%s: loading this service's kernel from torch's extension cache (a first build: ~20 s)", what)
    try:
        with _ninja_on_path():
            module = cpp_extension.load(name, [str(source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                        verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: any of them means the fallback
        log.warning("%s: %s (this service's own kernel did not build: %s)", what, instead,
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return None
    log.info("%s: this service's kernel", what)
    return module


def _works(module: types.ModuleType) -> bool:
    """A tiny trial: an identity-like product, odd sizes included (padding), against the float result."""
    weight = torch.eye(40)[:33] * 0.5
    x = torch.linspace(-3, 5, 80).view(2, 40)
    quantized = torch.round(weight / (0.5 / 127)).to(torch.int8)
    y = module.linear(x, module.pack(quantized), torch.full((33,), 0.5 / 127), quantized.sum(1, dtype=torch.int32),
                      torch.ones(33))
    return torch.allclose(y, x[:, :33] * 0.5 + 1, rtol=0.02, atol=0.05)


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
