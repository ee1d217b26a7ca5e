"""The LM's whole step (app/lean_lm.py, app/csrc/lean_lm.cpp): a decoding step of the whole LM in one C++ call
where every layer takes the whole-layer step. Built here for real: next tokens within rounding of the layers' steps
under audiocraft's LM, the streaming state moved on as audiocraft moves it, every steady step taken by it, the
fallbacks, what it refuses, the interpreter left to other threads while it runs, and the default server on it."""

import copy
import sys
import threading
import time
import typing as tp

import pytest
import torch

from app import fast_lm, lean_lm, precision
from tests.helpers import built_kernels
from tests.test_fast_lm import SMALL, drift, greedy_tokens, musicgen, next_token_distributions, sharpened
from tests.test_lean_step import conditions
from tests.test_whole_layer import CACHES, Counted


@pytest.fixture(scope="module")
def kernels():
    return built_kernels("the layers' steps run under audiocraft's LM", lean_lm._kernels)


def int8_default(stock, whole_lm: bool = True, **install: tp.Any):
    """A copy of `stock` (a MusicGen) as the CPU default builds it (`int8_kv_cache=False`: with the fp16 cache)."""
    mg = copy.deepcopy(stock)
    precision.apply(mg.lm, "int8-dynamic", "cpu")
    install = {"int8_weights": True, "half_kv_cache": True, "int8_kv_cache": True, **install}
    counts = fast_lm.install(mg.lm, True, True, whole_lm=whole_lm, **install)
    return mg, counts


def counted(mg) -> Counted:
    """Count the LM's whole steps from now on."""
    mg.lm.lean_lm = mg.lm.lean_lm._replace(step=Counted(mg.lm.lean_lm.step))
    return mg.lm.lean_lm.step


@CACHES
@pytest.mark.parametrize("sharpness", [1.0, 12.0], ids=["random", "peaked"])
def test_next_tokens_are_the_layers_steps_within_rounding(kernels, sharpness, int8_cache):
    stock = sharpened(musicgen(SMALL), sharpness)
    (whole, counts), (layers, layer_counts) = (int8_default(stock, flag, int8_kv_cache=int8_cache)
                                               for flag in (True, False))
    assert (counts["whole_lm"], layer_counts["whole_lm"]) == (1, 0)
    assert counts["whole_layer"] == layer_counts["whole_layer"] == len(stock.lm.transformer.layers)
    step = counted(whole)
    reference, logp = next_token_distributions(layers), next_token_distributions(whole)
    # No capacity announced: step 0 and the cache's growths at 2, 4 and 8 (fast_lm.GROWTH) take audiocraft's
    # forward, every other step the whole step.
    assert step.calls == 12
    kl, agreement = drift(reference, logp)
    assert abs(kl) < 1e-5 and agreement > 0.95, (kl, agreement)


def streaming_state_after(mg, steps: int) -> tp.Tuple[tp.List[int], int, int, torch.Tensor]:
    """Every layer's cache length, the transformer's and the fuser's offsets after `steps` single steps, and the
    logits of the last."""
    lm = mg.lm
    tokens = torch.randint(0, lm.card, (2, lm.num_codebooks, steps), generator=torch.Generator().manual_seed(0))
    cond = conditions(lm)
    with torch.inference_mode(), lm.streaming():
        for m in lm.modules():
            if hasattr(m, "static_capacity"):
                m.static_capacity = steps
        for step in range(steps):
            logits = lm(tokens[..., step: step + 1], [], condition_tensors=cond)
        lengths = [layer.self_attn._streaming_state["static_length"] for layer in lm.transformer.layers]
        offsets = [lm.transformer._streaming_state["offsets"], lm.fuser._streaming_state["offsets"]]
        assert all(offset.tolist() == [offset[0]] * 2 for offset in offsets)
        return lengths, int(offsets[0][0]), int(offsets[1][0]), logits


def test_it_moves_the_streaming_state_on_as_audiocraft_does(kernels):
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag) for flag in (True, False))
    step = counted(whole)
    got, expected = streaming_state_after(whole, 9), streaming_state_after(layers, 9)
    assert step.calls == 8
    assert got[:3] == expected[:3] == ([9] * len(stock.lm.transformer.layers), 9, 9)
    assert got[3].shape == expected[3].shape == (2, stock.lm.num_codebooks, 1, stock.lm.card)
    assert torch.allclose(got[3], expected[3], atol=1e-3 * float(expected[3].abs().max()))


@CACHES
def test_generations_with_a_prompt_windows_and_a_grown_cache(kernels, int8_cache):
    """Each window re-reads the last as a prompt (audiocraft's forward), the cache grows mid-generation: the whole
    step takes every steady step and greedy tokens stay the layers' steps'."""
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag, int8_kv_cache=int8_cache) for flag in (True, False))
    expected = greedy_tokens(layers, 2.0, max_duration=1.0)
    step = counted(whole)
    got = greedy_tokens(whole, 2.0, max_duration=1.0)
    assert step.calls > 50
    assert got.shape == expected.shape and float((got == expected).float().mean()) > 0.9


def test_a_condition_summed_into_the_input_takes_audiocrafts_forward(kernels):
    """A condition the fuser sums into the input (none of MusicGen's checkpoints has one) changes the input at every
    step: audiocraft's forward runs those steps, with the same logits as without the whole step."""
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag) for flag in (True, False))
    step = counted(whole)
    summed = torch.randn(2, 1, stock.lm.dim, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, stock.lm.card, (2, stock.lm.num_codebooks, 4), generator=torch.Generator().manual_seed(0))
    logits = []
    for mg in (whole, layers):
        lm = mg.lm
        lm.fuser.cond2fuse["bpm"] = "sum"
        cond = {**conditions(lm), "bpm": (summed, torch.ones(2, 1))}
        with torch.inference_mode(), lm.streaming():
            logits.append([lm(tokens[..., i: i + 1], [], condition_tensors=cond) for i in range(4)])
    assert step.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))


def test_a_prompt_takes_audiocrafts_forward(kernels):
    """A prompt (several tokens at once: a first step, a window's re-read) runs audiocraft's forward, the same numbers
    as without the whole step; the steps after it take the whole step."""
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag) for flag in (True, False))
    step = counted(whole)
    tokens = torch.randint(0, stock.lm.card, (2, stock.lm.num_codebooks, 6), generator=torch.Generator().manual_seed(1))
    logits = []
    for mg in (whole, layers):
        lm = mg.lm
        with torch.inference_mode(), lm.streaming():
            for m in lm.modules():
                if hasattr(m, "static_capacity"):
                    m.static_capacity = 6
            cond = conditions(lm)
            logits.append([lm(tokens[..., :5], [], condition_tensors=cond),
                           lm(tokens[..., 5:], [], condition_tensors=cond)])
    assert step.calls == 1
    assert torch.equal(logits[0][0], logits[1][0])
    assert torch.allclose(logits[0][1], logits[1][1], atol=1e-3 * float(logits[1][1].abs().max()))


def stepped_with_hooks(mg, pre_hook: tp.Any = None, hook: tp.Any = None, steps: int = 6) -> torch.Tensor:
    """The logits of `steps` single steps with `pre_hook` (and `hook`, a forward hook) on every layer."""
    lm = mg.lm
    handles = [layer.register_forward_pre_hook(pre_hook) for layer in lm.transformer.layers if pre_hook]
    handles += [layer.register_forward_hook(hook) for layer in lm.transformer.layers if hook]
    tokens = torch.randint(0, lm.card, (2, lm.num_codebooks, steps), generator=torch.Generator().manual_seed(3))
    try:
        with torch.inference_mode(), lm.streaming():
            for m in lm.modules():
                if hasattr(m, "static_capacity"):
                    m.static_capacity = steps
            cond = conditions(lm)
            return torch.cat([lm(tokens[..., i: i + 1], [], condition_tensors=cond) for i in range(steps)], dim=2)
    finally:
        for handle in handles:
            handle.remove()


def test_the_layers_pre_hooks_run_before_each_layer_with_its_input(kernels):
    """app/model.py's threads policy looks between the layers through their forward pre-hooks: the whole step runs
    them before each layer's step, with the layer's input, and takes an input one returns, as a module call does."""
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag) for flag in (True, False))
    step = counted(whole)
    seen: tp.Dict[str, tp.List[tp.Tuple[int, tp.Tuple[int, ...]]]] = {"whole": [], "layers": []}

    def recorder(name: str) -> tp.Any:
        def pre_hook(layer: torch.nn.Module, args: tp.Tuple[torch.Tensor, ...]) -> None:
            seen[name].append((id(layer), tuple(args[0].shape)))
        return pre_hook

    got, expected = (stepped_with_hooks(mg, recorder(name)) for mg, name in ((whole, "whole"), (layers, "layers")))
    assert step.calls == 5
    order = [[layer_id for layer_id, _ in seen[name]] for name in seen]
    depth = len(stock.lm.transformer.layers)
    assert [order[0][i] for i in range(depth)] == [id(layer) for layer in whole.lm.transformer.layers]
    assert len(order[0]) == len(order[1]) == 6 * depth
    assert {shape for _, shape in seen["whole"][depth:]} == {(2, 1, stock.lm.dim)}
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))

    def silenced(layer: torch.nn.Module, args: tp.Tuple[torch.Tensor, ...]) -> torch.Tensor:
        return args[0] * 0.5  # an input a pre-hook returns goes to the layer

    got, expected = (stepped_with_hooks(mg, silenced) for mg in (whole, layers))
    assert step.calls == 10
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))
    assert not torch.allclose(got, stepped_with_hooks(layers), atol=1e-3 * float(expected.abs().max()))


def test_a_pre_hook_that_raises_stops_the_step_and_the_next_generation_works(kernels):
    """What the service's cancellation relies on: an exception raised between layers (a pre-hook) comes out of the
    whole step as itself, and the LM decodes again afterwards."""
    mg, _ = int8_default(musicgen(SMALL))
    step = counted(mg)
    calls = []

    class Stopped(Exception):
        pass

    def raising(layer: torch.nn.Module, args: tp.Tuple[torch.Tensor, ...]) -> None:
        calls.append(layer)
        if len(calls) == len(mg.lm.transformer.layers) + 2:  # inside the second step, the whole step's first
            raise Stopped("stop")

    with pytest.raises(Stopped, match="stop"):
        stepped_with_hooks(mg, raising)
    assert step.calls == 1
    assert torch.isfinite(stepped_with_hooks(mg)).all() and step.calls == 6


def test_a_layer_with_a_forward_hook_takes_audiocrafts_forward(kernels):
    stock = musicgen(SMALL)
    (whole, _), (layers, _) = (int8_default(stock, flag) for flag in (True, False))
    step = counted(whole)
    calls = []

    def hook(layer: torch.nn.Module, args: tp.Any, output: torch.Tensor) -> None:
        calls.append(layer)

    got, expected = (stepped_with_hooks(mg, hook=hook) for mg in (whole, layers))
    assert step.calls == 0 and len(calls) == 2 * 6 * len(stock.lm.transformer.layers)
    assert torch.equal(got, expected)
    stepped_with_hooks(whole)
    assert step.calls == 5  # the hook removed, the whole step again


def test_only_an_lm_whose_layers_all_take_the_whole_layer_step_takes_it(kernels):
    stock = musicgen(SMALL)
    assert int8_default(stock)[1]["whole_lm"] == 1
    assert int8_default(stock, whole_layer=False)[1]["whole_lm"] == 0
    assert int8_default(stock, own_int8_kernel=False)[1]["whole_lm"] == 0  # fbgemm's products
    assert int8_default(stock, half_kv_cache=False)[1]["whole_lm"] == 0  # fp32 cache: the Python lean step
    assert int8_default(stock, whole_lm=False)[1]["whole_lm"] == 0
    fp32 = copy.deepcopy(stock)
    assert fast_lm.install(fp32.lm, True, True, packed_weights=True, half_kv_cache=True)["whole_lm"] == 0
    assert not lean_lm.installed(fp32.lm) and lean_lm.installed(int8_default(stock)[0].lm)


def test_it_refuses_what_it_cannot_take(kernels):
    mg, _ = int8_default(musicgen(SMALL), int8_kv_cache=False)
    lm = mg.lm
    layers, heads, dim = len(lm.transformer.layers), lm.transformer.layers[0].self_attn.num_heads, lm.dim
    keys = [torch.zeros(2, heads, 8, dim // heads, dtype=torch.float16) for _ in range(layers)]
    cross = [torch.zeros(2, heads, 3, dim // heads) for _ in range(layers)]
    none = [None] * layers
    step = lm.lean_lm.step
    tokens = torch.zeros(2, lm.num_codebooks, 1, dtype=torch.long)

    def run(tokens: torch.Tensor = tokens, length: int = 7, keys: tp.List[tp.Any] = keys) -> torch.Tensor:
        return step.step(tokens, 12, length, keys, [k.clone() for k in keys], cross, cross, none, none)

    assert run().shape == (2, lm.num_codebooks, 1, lm.card)
    with pytest.raises(RuntimeError, match="a token outside its embedding"):
        run(tokens + lm.card + 1)  # the special token (card) is the last of each table
    assert run(tokens + lm.card).shape == (2, lm.num_codebooks, 1, lm.card)
    with pytest.raises(RuntimeError, match=r"long tokens \[batch, codebooks, 1\]"):
        run(tokens.repeat(1, 1, 2))
    with pytest.raises(RuntimeError, match="a cache of each kind per layer"):
        run(keys=keys[:-1])
    with pytest.raises(RuntimeError, match="the cache's shape"):
        run(length=8)  # no room left at 8
    kernel = lean_lm._kernels()
    embeddings, periods, scale, norm, heads = lean_lm._parts(lm)
    whole = [layer.lean_plan.whole for layer in lm.transformer.layers]
    with pytest.raises(RuntimeError, match="an embedding and an output product per codebook"):
        kernel.LM(embeddings, periods, scale, whole, norm, heads[:-1])
    with pytest.raises(RuntimeError, match="periods"):
        kernel.LM(embeddings, periods[:-1], scale, whole, norm, heads)
    with pytest.raises(RuntimeError, match="embeddings"):
        kernel.LM([e[:, :-16] for e in embeddings], periods, scale, whole, norm, heads)


def test_the_interpreter_is_left_to_other_threads_while_it_runs(kernels):
    """A server thread (an SSE stream, a 503) keeps running Python during a whole step, as during torch's operators:
    with a switch interval longer than the step, a thread that counts could only count while the step left the
    interpreter."""
    mg, _ = int8_default(musicgen(SMALL))
    lm = mg.lm
    layers, heads, dim = len(lm.transformer.layers), lm.transformer.layers[0].self_attn.num_heads, lm.dim
    capacity = 20000  # a long context: a step of a few ms, even for this small LM
    keys = [torch.zeros(2, heads, capacity, dim // heads, dtype=torch.int8) for _ in range(layers)]
    scales = [torch.ones(2, heads, capacity) for _ in range(layers)]
    cross = [torch.zeros(2, heads, 3, dim // heads) for _ in range(layers)]
    tokens = torch.zeros(2, lm.num_codebooks, 1, dtype=torch.long)
    count, stop = [0], threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0.0001)  # leaves the interpreter: the step's caller can take it back after the step

    before = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    thread = threading.Thread(target=counter)
    thread.start()
    try:
        time.sleep(0.01)
        counts = []
        for _ in range(3):
            start = count[0]
            lm.lean_lm.step.step(tokens, 0, capacity - 1, keys, keys, cross, cross, scales, scales)
            counts.append(count[0] - start)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(before)
    assert max(counts) > 0, counts
