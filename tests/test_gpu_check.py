"""scripts/gpu_check and what it is made of, where no GPU is needed: the no-GPU answer, the stand-ins, the wheel
plan, and the GPU benchmark script run end to end on CPU with a tiny model."""

import json
import os
import subprocess
import sys

import torch

from tests.helpers import ROOT
from tests.test_fast_lm import SMALL, greedy_tokens, musicgen

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU, where there is one


def test_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    for args in (["--locks"], ["--wheels", str(tmp_path), "--python", sys.executable]):
        done = subprocess.run([str(ROOT / "scripts" / "gpu_check"), *args], env=NO_GPU, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        said = [line for line in done.stderr.splitlines() if line.startswith("gpu_check")]  # (pip may talk first)
        assert done.stdout == "" and len(said) == 1 and said[0] == done.stderr.splitlines()[-1], done.stderr
        assert said[0].startswith(f"gpu_check: no CUDA GPU: torch {torch.__version__} ")
        assert said[0].endswith("nothing was run")


def test_stand_ins_decode_the_tokens_of_the_real_packages():
    """With scripts/gpu_standins first on the path (xformers, spaCy and PyAV are stand-ins), audiocraft imports
    and generates the same tokens: on the einsum path (debug model) and on torch's attention kernels with
    windows, whose prompts take the causal-mask branch."""
    code = "\n".join([
        "import json, av, spacy, xformers",
        "assert xformers.STAND_IN and spacy.STAND_IN and av.STAND_IN",
        "from tests.test_fast_lm import SMALL, greedy_tokens, musicgen",
        "tokens = [greedy_tokens(musicgen(None), 1.0), greedy_tokens(musicgen(SMALL), 2.0, 1.0)]",
        "print(json.dumps([t.tolist() for t in tokens]))",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts" / "gpu_standins"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    expected = [greedy_tokens(musicgen(None), 1.0).tolist(), greedy_tokens(musicgen(SMALL), 2.0, 1.0).tolist()]
    assert json.loads(done.stdout.splitlines()[-1]) == expected


def test_the_wheel_plan_accounts_for_every_package_of_the_lock():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels"), "--list"], capture_output=True,
                          text=True, timeout=60, check=True)
    shipped = {line.split()[1].split("==")[0] for line in done.stdout.splitlines() if line.startswith("ship ")}
    left = {line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("left ")}
    locked = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert locked <= shipped | left and not shipped & left
    assert {"audiocraft", "flask", "gunicorn", "pydantic", "pytest", "pytest-timeout"} <= shipped
    assert {"torch", "torchaudio", "transformers", "numpy", "xformers", "spacy", "av"} <= left


def test_gpu_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """A smoke run of scripts/bench_gpu.py (tiny model, eager steps on CPU): it writes its report, and the static
    step gives stock's tokens, greedy and sampled with the same seed."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu", "--sizes",
                           "tiny", "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    tiny = json.loads((tmp_path / "benchmarks-gpu.json").read_text())["sizes"]["tiny"]
    assert tiny["agreement"]["greedy"]["identical"] and tiny["agreement"]["sampled, same seed"]["identical"]
    assert tiny["median_steps_per_s"]["stock"] > 0 and tiny["median_steps_per_s"]["graph"] > 0
    assert "| tiny | 0 M | 0.5 s |" in (tmp_path / "benchmarks-gpu.md").read_text()
