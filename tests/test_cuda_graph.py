"""The graph-ready decoding step (app/cuda_graph.py) run eagerly on CPU: stock's tokens from fixed buffers.

The capture and replay of that step as a CUDA graph are tested in tests/test_cuda.py (on a GPU).
"""

import copy
import logging
import typing as tp

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.conditioners import ConditioningAttributes

from app import cuda_graph
from app.config import Settings
from app.model import MusicModel, Speedups
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen


def window_steps(mg: MusicGen) -> int:
    return mg.lm.pattern_provider.get_pattern(int(mg.max_duration * mg.frame_rate)).num_sequence_steps


def static(mg: MusicGen, capacity: tp.Optional[int] = None) -> MusicGen:
    """A copy of `mg` decoding through the static decoder, eagerly (graphs need CUDA)."""
    fast = copy.deepcopy(mg)
    assert cuda_graph.install(fast.lm, capacity or window_steps(fast), graphs=False).startswith("on")
    return fast


def sampled_tokens(mg: MusicGen, seed: int, **params: tp.Any) -> torch.Tensor:
    mg.set_generation_params(use_sampling=True, duration=2.0, cfg_coef=3.0, **params)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return mg.generate(["90s rock", "calm piano"], return_tokens=True)[1]


@pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
@pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
def test_static_step_gives_stock_greedy_tokens(sizes, max_duration):
    """Masked attention over the whole key buffer, positions and masks from a device tensor: the same tokens as
    stock's attention over the grown cache. Windowed: each window's prompt goes through the eager prefill."""
    stock = musicgen(sizes)
    fast = static(stock)
    assert torch.equal(greedy_tokens(fast, 2.0, max_duration), greedy_tokens(stock, 2.0, max_duration))


@pytest.mark.parametrize("params", [{"top_k": 250}, {"top_k": 0, "top_p": 0.9}, {"top_k": 0, "temperature": 1.3}],
                         ids=["top-k", "top-p", "plain"])
def test_static_step_samples_what_stock_samples(params):
    """The draw is torch.multinomial's own (argmax of p / Exp(1) noise), from the same generator: same seed,
    same tokens."""
    stock = musicgen()
    fast = static(stock)
    expected = sampled_tokens(stock, 7, **params)
    assert torch.equal(sampled_tokens(fast, 7, **params), expected)
    assert not torch.equal(sampled_tokens(fast, 8, **params), expected)


def test_multinomial_without_host_checks_draws_what_torch_draws():
    probs = torch.softmax(3 * torch.randn(2, 4, 400), dim=-1)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = torch.multinomial(probs.reshape(-1, 400), 1).reshape(2, 4, 1)
        after = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(cuda_graph._multinomial(probs), expected)
        assert torch.equal(torch.rand(3), after)  # the generator advanced by as much


def test_steps_run_on_fixed_buffers():
    """What a graph needs: every step reads and writes the same tensors, across generations too, and the
    position advances on the device."""
    fast = static(musicgen())
    decoder = fast.lm.static_decoder
    seen = []

    def record(*_):
        tokens, next_token = decoder._io[2]
        seen.append((decoder.position.data_ptr(), tokens.data_ptr(), next_token.data_ptr(),
                     tuple(k.data_ptr() for k, _ in decoder._cache), int(decoder.position)))

    fast.set_custom_progress_callback(record)
    greedy_tokens(fast, 1.0, progress=True)
    greedy_tokens(fast, 1.0, progress=True)
    assert len({tuple(address) for *address, _ in seen}) == 1
    steps = len(seen) // 2
    assert [position for *_, position in seen] == list(range(1, steps + 1)) * 2
    assert all(k.shape[1] == decoder.capacity and k.shape[1] % cuda_graph.ALIGN == 0 for k, _ in decoder._cache)


def test_buffers_grow_when_a_generation_needs_more():
    stock = musicgen()
    fast = static(stock, capacity=10)
    assert torch.equal(greedy_tokens(fast, 2.0), greedy_tokens(stock, 2.0))
    assert fast.lm.static_decoder.capacity >= fast.lm.pattern_provider.get_pattern(50).num_sequence_steps


def test_two_step_guidance_is_left_to_stock():
    """A generation the step does not cover (here two-step CFG, asked for at call time) decodes as stock."""
    stock = musicgen()
    fast = static(stock)
    attributes = [ConditioningAttributes(text={"description": "90s rock"})]
    with torch.inference_mode():
        expected = stock.lm.generate(None, attributes, max_gen_len=20, use_sampling=False, two_step_cfg=True)
        assert torch.equal(fast.lm.generate(None, attributes, max_gen_len=20, use_sampling=False, two_step_cfg=True),
                           expected)
    assert fast.lm.static_decoder.position == 0


def test_models_it_does_not_cover_are_left_untouched():
    lm = musicgen().lm
    lm.two_step_cfg = True
    assert cuda_graph.install(lm, 100, graphs=False) == "off (two-step classifier-free guidance)"
    assert not hasattr(lm, "static_decoder") and "_sample_next_token" not in vars(lm)
    lm = musicgen().lm
    lm.fuser.fuse2cond["prepend"] = ["self_wav"]
    assert cuda_graph.install(lm, 100, graphs=False).startswith("off (conditions fused other than")
    with pytest.raises(ValueError, match="CUDA"):
        cuda_graph.install(musicgen().lm, 100, graphs=True)


def test_the_setting_is_opt_in_and_cuda_only(caplog):
    assert Settings.from_env({}).cuda_graph is False
    assert Settings.from_env({"MUSICGEN_CUDA_GRAPH": "1"}).cuda_graph is True
    with caplog.at_level(logging.INFO, logger="app.model"):
        model = MusicModel.load("debug", "cpu", "debug", speedups=Speedups(cuda_graph=True))
    assert "MUSICGEN_CUDA_GRAPH applies to CUDA only: off on cpu" in caplog.text
    assert not hasattr(model.musicgen.lm, "static_decoder")
