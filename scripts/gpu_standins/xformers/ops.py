"""xformers.ops as audiocraft 1.3.0 uses it on its default `torch` attention backend."""

import typing as tp

import torch


def unbind(x: torch.Tensor, dim: int) -> tp.Tuple[torch.Tensor, ...]:
    """The views xformers' unbind returns (it differs only in how it back-propagates)."""
    return torch.unbind(x, dim)


class LowerTriangularMask:
    """audiocraft returns one as a causal mask and only checks it against None on the torch backend."""


def memory_efficient_attention(*args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
    raise NotImplementedError("xformers is a stand-in here (scripts/gpu_check): audiocraft's `xformers` attention "
                              "backend needs the real package")
