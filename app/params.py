"""What one generation is asked to do: the domain's own parameters (no HTTP, no schema library).

The edge (`app/validation.py`) checks a request against its schema and builds these; everything below
it (generation, model, audio) takes them as they are. The defaults live here, and the schema states them.
"""

import dataclasses
import typing as tp

MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One clip to generate: the text, its length, how to sample and how to decode."""

    description: str
    duration: int = 30  # seconds
    mbd: bool = False  # decode with MultiBand Diffusion instead of EnCodec
    top_k: int = 250  # 0 disables top-k
    top_p: float = 0.0  # > 0 replaces top-k
    temperature: float = 1.0  # 0 is greedy decoding
    cfg_coef: float = 3.0  # classifier-free guidance
    seed: tp.Optional[int] = None  # None: the service draws one


DEFAULTS = GenerationParams(description="")
