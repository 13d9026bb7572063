"""Rounding of real values to integers, in every mode numcast offers.

All functions take a floating tensor ``v`` whose integer part is exactly representable (|v| < 2^p of the
working dtype) and return the rounded values in the same dtype. ``noise`` is a tensor of uniforms in
[0, 1) with v's shape, drawn by the caller from an explicit ``torch.Generator``: rounding never touches
the global RNG.
"""

from __future__ import annotations

import torch

from numcast.formats.spec import ROUNDINGS


def round_to_int(v: torch.Tensor, mode: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round ``v`` to integers.

    - ``nearest_even``: IEEE 754 roundTiesToEven (OCP, ml_dtypes, TensorCast default).
    - ``nearest_away``: ties away from zero (microxcaling's "nearest").
    - ``toward_zero`` / ``floor`` / ``ceil``: directed rounding.
    - ``stochastic``: floor(v) + [u < frac(v)], unbiased: E[result] = v up to the 2^−24 granularity of u.
    """
    if mode == "nearest_even":
        return torch.round(v)
    if mode == "nearest_away":
        t = torch.trunc(v)
        return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))
    if mode == "toward_zero":
        return torch.trunc(v)
    if mode == "floor":
        return torch.floor(v)
    if mode == "ceil":
        return torch.ceil(v)
    if mode == "stochastic":
        if noise is None:
            raise ValueError("stochastic rounding needs uniform noise (pass a generator or a seed)")
        f = torch.floor(v)
        return f + (noise.to(v.dtype) < (v - f)).to(v.dtype)
    raise ValueError(f"unknown rounding mode {mode!r}; one of {ROUNDINGS}")


def make_noise(
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) float32 noise for stochastic rounding from an explicit generator or seed."""
    if generator is None:
        if seed is None:
            raise ValueError(
                "stochastic rounding needs an explicit torch.Generator or seed (the global RNG is never used)"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
