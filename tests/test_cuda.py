"""The CUDA side, run by scripts/gpu_check on a machine with an NVIDIA GPU (elsewhere every test here skips).

fp16 autocast generation and MultiBand Diffusion on CUDA; out of GPU memory through the real server; the GPU
memory metrics; and the decoding speed-ups' tokens on CUDA: app/fast_lm.py's caches and app/cuda_graph.py's
graphs against stock audiocraft, and the replayed graphs against the same step run eagerly.
"""

import contextlib
import copy
import re
import typing as tp

import pytest
import requests
import torch
from audiocraft.models import MusicGen

from app import cuda_graph, fast_lm
from app.model import MusicModel
from app.params import GenerationParams
from tests.helpers import Server, events, generate
from tests.test_cuda_graph import sampled_tokens, window_steps
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen

pytestmark = pytest.mark.cuda

MODELS = pytest.mark.parametrize("sizes", [None, SMALL], ids=["debug", "small-random"])
WINDOWS = pytest.mark.parametrize("max_duration", [None, 1.0], ids=["one-window", "windowed"])
OUT_OF_MEMORY = {"event": "error", "message": "out of GPU memory; try a shorter duration"}


def on_cuda(mg: MusicGen) -> MusicGen:
    """A CUDA copy of a model built on CPU; audiocraft runs its LM under fp16 autocast there."""
    return MusicGen(mg.name, copy.deepcopy(mg.compression_model).cuda(), copy.deepcopy(mg.lm).cuda())


def graphed(mg: MusicGen, graphs: bool = True) -> MusicGen:
    fast = copy.deepcopy(mg)
    assert cuda_graph.install(fast.lm, window_steps(fast), graphs=graphs).startswith("on")
    return fast


def complete(url: str, **body: tp.Any) -> tp.Dict[str, tp.Any]:
    """The terminal event of one generation through the server."""
    with generate(url, {"description": "drums", "duration": 2, "seed": 1, **body}) as response:
        assert response.status_code == 200, response.text
        return list(events(response))[-1]


def metric(url: str, name: str, **labels: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{selector} not in /metrics:\n{text}"
    return float(match.group(1))


@contextlib.contextmanager
def all_free_gpu_memory() -> tp.Iterator[None]:
    """Hold (in this test process) every byte of GPU memory nobody else holds, until the block ends."""
    chunks, size = [], 1 << 30
    while size >= 1 << 20:
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    try:
        yield
    finally:
        chunks.clear()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name, duration", [("debug", 2), ("debug-small", 1)])
def test_fp16_autocast_generation(name, duration):
    model = MusicModel.load(name, "cuda", "debug")
    lm = model.musicgen.lm
    assert next(lm.parameters()).is_cuda and next(lm.parameters()).dtype == torch.float32  # stock weights
    dtypes, stages = set(), []
    hook = lm.transformer.layers[0].linear1.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    try:
        wav = model.generate(GenerationParams(description="drums", duration=duration), 1, stages.append)
    finally:
        hook.remove()
    assert dtypes == {torch.float16}  # audiocraft's autocast
    assert wav.shape == (1, duration * model.sample_rate) and wav.dtype == torch.float32
    assert torch.isfinite(wav).all() and wav.abs().max() > 0
    assert stages.count("lm") == model.lm_steps(duration) and stages.count("decode") == 1


def test_multiband_diffusion_on_cuda():
    model = MusicModel.load("debug", "cuda", "debug", preload_mbd=True)
    assert all(p.is_cuda for process in model.mbd.DPs for p in process.model.parameters())
    stages = []
    wav = model.generate(GenerationParams(description="drums", duration=2, mbd=True), 1, stages.append)
    assert wav.shape == (1, 2 * model.sample_rate) and torch.isfinite(wav).all()
    assert stages.count("diffusion") == model.diffusion_steps()


@pytest.fixture(scope="module")
def cuda_server():
    """A real server (scripts/serve, gunicorn) on the GPU with the musicgen-small-sized random model."""
    with Server(env={"MUSICGEN_DEVICE": "cuda", "MUSICGEN_MODEL": "debug-small"}) as server:
        server.wait(timeout=600)
        yield server


def test_gpu_memory_metrics(cuda_server):
    assert cuda_server.health()["device"].startswith("cuda")
    assert complete(cuda_server.url)["event"] == "completed"
    allocated = metric(cuda_server.url, "musicgen_gpu_memory_allocated_bytes")
    reserved = metric(cuda_server.url, "musicgen_gpu_memory_reserved_bytes")
    assert 1e9 < allocated <= reserved  # the LM alone is 1.2 GB of fp32 weights


def test_out_of_memory_ends_in_an_error_event_and_the_next_request_works(cuda_server):
    url, body = cuda_server.url, {"duration": 10}
    assert complete(url, **body)["event"] == "completed"  # loads every kernel the failing request will use
    before = metric(url, "musicgen_gpu_memory_reserved_bytes")  # the worker empties the cache after each job
    errors = metric(url, "musicgen_requests_total", outcome="error")
    with all_free_gpu_memory():
        assert complete(url, **body) == OUT_OF_MEMORY
        after = metric(url, "musicgen_gpu_memory_reserved_bytes")
    assert after <= before + 64 * 2**20  # what the failed generation had taken went back to the GPU
    assert metric(url, "musicgen_requests_total", outcome="error") == errors + 1
    assert complete(url, **body)["event"] == "completed"
    assert "out of GPU memory" in cuda_server.output()


@MODELS
@WINDOWS
def test_fast_lm_caches_give_stock_tokens_on_cuda(sizes, max_duration):
    stock = on_cuda(musicgen(sizes))
    fast = copy.deepcopy(stock)
    fast_lm.install(fast.lm, cross_kv_cache=True, static_kv_cache=True)
    assert torch.equal(greedy_tokens(fast, 2.0, max_duration), greedy_tokens(stock, 2.0, max_duration))


@MODELS
@WINDOWS
def test_graph_gives_stock_greedy_tokens(sizes, max_duration):
    stock = on_cuda(musicgen(sizes))
    fast = graphed(stock)
    assert torch.equal(greedy_tokens(fast, 2.0, max_duration), greedy_tokens(stock, 2.0, max_duration))
    decoder = fast.lm.static_decoder
    assert decoder.graphs and decoder.captures >= 1 and decoder.replays > 0


@MODELS
def test_graph_replays_the_eager_step_bit_for_bit(sizes):
    """A replay runs the kernels captured from the eager step on the same buffers: the same tokens, and the
    same bits in every key and value the steps wrote."""
    stock = on_cuda(musicgen(sizes))
    eager, replayed = graphed(stock, graphs=False), graphed(stock)
    assert torch.equal(greedy_tokens(replayed, 2.0), greedy_tokens(eager, 2.0))
    assert replayed.lm.static_decoder.replays > 0 and eager.lm.static_decoder.replays == 0
    for (k, v), (replayed_k, replayed_v) in zip(eager.lm.static_decoder._cache, replayed.lm.static_decoder._cache,
                                                strict=True):
        assert torch.equal(k, replayed_k) and torch.equal(v, replayed_v)


@pytest.mark.parametrize("params", [{"top_k": 250}, {"top_k": 0, "top_p": 0.9}], ids=["top-k", "top-p"])
def test_graph_samples_what_the_eager_step_samples(params):
    """The draw inside the graph takes its random numbers from the default generator as the eager step does:
    the same seed gives the same tokens, with a graph captured now or reused."""
    stock = on_cuda(musicgen(SMALL))
    eager, replayed = graphed(stock, graphs=False), graphed(stock)
    expected = sampled_tokens(eager, 7, **params)
    assert torch.equal(sampled_tokens(replayed, 7, **params), expected)
    assert torch.equal(sampled_tokens(replayed, 7, **params), expected)
    assert not torch.equal(sampled_tokens(replayed, 8, **params), expected)
    assert replayed.lm.static_decoder.captures == 1


def test_graph_through_the_server():
    with Server(env={"MUSICGEN_DEVICE": "cuda", "MUSICGEN_CUDA_GRAPH": "1"}) as server:
        server.wait(timeout=600)
        first = complete(server.url, temperature=0)
        second = complete(server.url, temperature=0)  # replays the graph the first one captured
        sampled = complete(server.url, duration=3)  # other sampling settings: a second graph
        log = server.output()
    assert first["event"] == second["event"] == sampled["event"] == "completed"
    assert first["audio"] == second["audio"]
    assert "CUDA graph decoding on (CUDA graphs" in log and log.count("captured a CUDA graph") == 2
