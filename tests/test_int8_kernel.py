"""This service's int8 product kernel (app/int8_kernel.py, app/csrc/int8_linear.cpp): built here for real, the
same products as fbgemm's dynamic quantization, and fbgemm's kernels wherever it cannot be had."""

import os
import subprocess
import sys

import pytest
import torch

from app import fast_lm, int8_kernel
from app.config import Settings
from app.model import Speedups
from tests.helpers import ROOT, built_kernels, skip_without_kernels

FALLBACK = "int8-dynamic runs on fbgemm's kernels"


@pytest.fixture(scope="module")
def kernel():
    return built_kernels(FALLBACK, int8_kernel.load)


def _pair(weight: torch.Tensor, bias) -> tuple:
    return fast_lm.Int8Linear(weight, bias), fast_lm.Int8Linear(weight, bias, own_kernel=False)


# (out_features, in_features, input shape's leading dims): the 2-row step, one row, odd rows, a prompt's many rows,
# sizes the kernel pads (out not a multiple of 32, in not a multiple of 4), the debug model's and musicgen-small's.
SHAPES = [(3072, 1024, (2, 1)), (1024, 4096, (2, 1)), (400, 16, (2, 1)), (48, 16, (1,)), (64, 16, (7,)),
          (33, 5, (3,)), (2048, 1024, (2, 150)), (17, 1, (2,))]


@pytest.mark.parametrize("out_features,in_features,leading", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_match_fbgemms_dynamic_quantization(kernel, out_features, in_features, leading, with_bias):
    generator = torch.Generator().manual_seed(out_features * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(*leading, in_features, generator=generator) * 3 + 0.5  # an input range not centred on 0
    own, fbgemm = _pair(weight, bias)
    assert own.kernel is kernel and fbgemm.kernel is None
    assert "kernel=own" in repr(own) and "kernel=fbgemm" in repr(fbgemm)
    exact = torch.nn.functional.linear(x, weight, bias)
    ours, theirs = own(x), fbgemm(x)
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    # The same quantization: the two differ by float rounding only, far less than either's error.
    scale = exact.abs().max()
    assert (ours - theirs).abs().max() <= 2e-3 * scale + 1e-6
    assert (ours - exact).abs().max() <= 1.05 * (theirs - exact).abs().max() + 1e-4 * scale


def test_threads_split_the_columns_without_changing_a_bit(kernel):
    weight, x = torch.randn(3072, 1024) * 0.02, torch.randn(2, 1, 1024)
    own = fast_lm.Int8Linear(weight, torch.randn(3072))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = own(x)
        torch.set_num_threads(2)
        two = own(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_edge_inputs(kernel):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator) * 0.05
    own, fbgemm = _pair(weight, torch.arange(64.0))
    zeros = torch.zeros(2, 32)
    assert torch.equal(own(zeros), torch.arange(64.0).expand(2, 64))  # all zeros: the bias, exactly
    assert own(torch.zeros(0, 32)).shape == (0, 64)
    strided = torch.randn(32, 2, generator=generator).t()  # not contiguous
    for x in (strided, strided.to(torch.bfloat16)):  # bf16 comes in as fp32, as fbgemm takes it
        exact = torch.nn.functional.linear(x.float(), weight)
        assert (own(x) - fbgemm(x)).abs().max() <= 2e-3 * exact.abs().max()


def test_a_whole_lm_decodes_on_it_and_drifts_from_fbgemm_by_rounding_only(kernel):
    from tests.test_fast_lm import SMALL, lowered, musicgen, next_token_distributions
    stock = musicgen(SMALL)
    own, fbgemm = lowered(stock, "int8-dynamic"), lowered(stock, "int8-dynamic-fbgemm")
    products = [m for m in own.lm.modules() if isinstance(m, fast_lm.Int8Linear)]
    assert products and all(m.kernel is kernel for m in products)
    assert all(m.kernel is None for m in fbgemm.lm.modules() if isinstance(m, fast_lm.Int8Linear))
    ours, theirs = next_token_distributions(own), next_token_distributions(fbgemm)
    kl = float((theirs.exp() * (theirs - ours)).sum(-1).mean())
    assert kl < 1e-4 and float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) > 0.95


def test_the_setting_chooses_the_kernel():
    assert Settings().int8_kernel is True
    assert Settings.from_env({"MUSICGEN_INT8_KERNEL": "0"}).int8_kernel is False
    assert Speedups.from_settings(Settings()).int8_kernel is True
    assert Speedups.from_settings(Settings(int8_kernel=False)).int8_kernel is False
    assert Speedups().int8_kernel is False  # stock unless asked (and int8 at all only with int8-dynamic)


def test_without_a_compiler_it_says_so_and_fbgemm_multiplies(tmp_path):
    """A machine without g++ (here: a compiler that fails, and an empty extension cache) still serves int8."""
    skip_without_kernels(FALLBACK)
    script = ("import logging, torch\n"
              "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "from app import fast_lm, int8_kernel\n"
              "assert int8_kernel.load() is None\n"
              "w, x = torch.eye(8), torch.arange(16.0).view(2, 8)\n"
              "m = fast_lm.Int8Linear(w, None)\n"
              "assert m.kernel is None and torch.allclose(m(x), x, atol=0.05), m(x)\n"
              "print('fbgemm served')\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fbgemm served" in run.stdout
    assert "int8 products: fbgemm's kernels (this service's own kernel did not build" in run.stderr
