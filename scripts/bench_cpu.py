"""What the CPU is and how fast its matrix-product kernels read weights, for scripts/bench.py.

A decoding step at batch 2 (the CFG pair) is a read of every weight, so how fast a step runs depends on the
rate at which each product kernel streams its weights from memory, which is not the rate of a plain sum: this
section measures both, on the 6 products of each of 24 layers with DISTINCT weights (as a real step reads them;
one matrix in a loop stays in the cache and misleads), and the same kernels on one layer's weights kept hot
in the cache (their compute rate), round-robin. It also records the CPU's family/model and the oneDNN kernels
that run (ONEDNN_VERBOSE in a child process, since oneDNN writes it to the process's own output).
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import torch

from app import fast_lm, int8_kernel

ROOT = Path(__file__).resolve().parents[1]
DIM = 1024  # musicgen-small
LAYERS = 24
# A layer's products at a step: fused q/k/v, attention output, cross-attention query and output, feed-forward x2.
SHAPES = [(3 * DIM, DIM), (DIM, DIM), (DIM, DIM), (DIM, DIM), (4 * DIM, DIM), (DIM, 4 * DIM)]
INT8_FBGEMM = "int8 weights x int8 activations (fbgemm, VNNI)"
INT8_OWN = "int8 weights x int8 activations (this service's AVX512-VNNI kernel)"


def cpu_identity() -> tp.Dict[str, tp.Any]:
    """Vendor, family/model/stepping, the flags that decide the kernels, transparent huge pages."""
    info: tp.Dict[str, tp.Any] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "cpu family", "model", "stepping", "model name") and key not in info:
            info[key] = value.strip()
        if key == "flags":
            flags = set(value.split())
            info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                                            "amx_int8", "avx512_fp16"})
            break
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    info["transparent_hugepages"] = thp.read_text().strip() if thp.exists() else "?"
    return info


_KERNEL_PROBE = """
import torch
torch.set_num_threads(1)
w = torch.randn(1024, 1024)
x = torch.randn(2, 1024)
packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 2)
torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], "")
torch.backends.quantized.engine = "onednn"
q = torch.quantize_per_channel(w, w.abs().amax(1).double() / 127, torch.zeros(1024, dtype=torch.long), 0, torch.qint8)
torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(q, None), False)
"""


def onednn_kernels() -> tp.Dict[str, tp.Any]:
    """The ISA oneDNN dispatches to, and the kernel each product runs with: packed bf16 (the bf16 default) and
    int8 with dynamically quantized activations on oneDNN's engine (the service's int8 runs its own kernel or
    fbgemm's, which oneDNN's verbose output cannot show)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], capture_output=True, text=True, env=env).stdout
    isa, kernels = "", {}
    for line in out.splitlines():
        fields = line.split(",")
        if "isa:" in line:
            isa = line.split("isa:", 1)[1]
        elif len(fields) > 6 and fields[2] == "primitive" and fields[3] == "exec" and fields[5] in (
                "inner_product", "matmul"):
            kind = "int8 (u8 x s8)" if "wei:s8" in line else "bf16 packed" if "wei:bf16" in line else fields[5]
            kernels[kind] = fields[6]
    return {"isa": isa, "kernels": kernels}


def _round_robin(variants: tp.Dict[str, tp.Callable[[], None]], reps: int) -> tp.Dict[str, float]:
    times: tp.Dict[str, tp.List[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm
    for _ in range(reps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _products(weights: tp.List[tp.List[torch.Tensor]], pack: tp.Callable[..., torch.nn.Module],
              dtype: torch.dtype, hot: bool = False) -> tp.Callable[[], None]:
    """The products of every layer; `hot`: the first layer's, packed once, run as many times (cache-resident)."""
    modules = [[pack(w.to(dtype), None) for w in layer] for layer in (weights[:1] if hot else weights)]
    modules = modules * len(weights) if hot else modules
    inputs = [torch.randn(2, shape[1]).to(dtype) for shape in SHAPES]

    def run() -> None:
        for layer in modules:
            for module, x in zip(layer, inputs, strict=True):
                module(x)
    return run


def product_rates(reps: int = 9) -> tp.Dict[str, tp.Any]:
    """ms for the 6 products of 24 layers (distinct weights, streamed from memory) per kernel, the weights'
    read rate that implies, the same kernels on one layer's weights repeated 24 times (hot in the cache), and
    a plain sum over 512 MB: round-robin in one process, 1 thread."""
    torch.manual_seed(0)
    weights = [[torch.randn(*shape) * 0.02 for shape in SHAPES] for _ in range(LAYERS)]
    params = sum(o * i for o, i in SHAPES) * LAYERS
    variants, sizes = {}, {}
    for name, pack, dtype, size in (
            ("packed bf16 (oneDNN brgemm)", fast_lm.PackedLinear, torch.bfloat16, 2),
            (INT8_FBGEMM, functools.partial(fast_lm.Int8Linear, own_kernel=False), torch.float32, 1),
            (INT8_OWN, fast_lm.Int8Linear, torch.float32, 1)):
        int8 = name in (INT8_FBGEMM, INT8_OWN)
        if (int8 and not fast_lm.can_quantize()) or (name == INT8_OWN and int8_kernel.load() is None):
            continue
        variants[name] = _products(weights, pack, dtype)
        variants[name + ", hot"] = _products(weights, pack, dtype, hot=True)
        sizes[name] = sizes[name + ", hot"] = size
    big = torch.ones(128 * 1024 * 1024)
    variants["plain sum over 512 MB"] = big.sum
    with _threads(1):
        medians = _round_robin(variants, reps)
    sum_rate = big.numel() * 4 / medians.pop("plain sum over 512 MB") / 1e9
    out = {name: {"ms": round(1000 * t, 1), "gb_s": round(params * sizes[name] / t / 1e9, 1),
                  "share_of_sum_rate": round(params * sizes[name] / t / 1e9 / sum_rate, 2)}
           for name, t in medians.items()}
    return {"layers": LAYERS, "weights_mb": {"bf16": round(2 * params / 1e6), "int8": round(params / 1e6)},
            "sum_gb_s": round(sum_rate, 1), "products": out}


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: tp.Any) -> None:
        torch.set_num_threads(self.before)


def cpu_section() -> tp.Dict[str, tp.Any]:
    return {"identity": cpu_identity(), "onednn": onednn_kernels(), "rates": product_rates()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(cpu_section(), indent=1))
