"""Shared test helpers.

Parity tests must randomise *every* parameter before comparing against a reference: default inits (zero
adaLN, LayerScale 1e-5, identity norms, zero biases) make whole code paths invisible, so a bug there would
pass. `randomize_` gives each tensor values that keep activations O(1) through a deep stack.
"""
import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, skip=()) -> nn.Module:
    """Fill every floating-point parameter of `module` with random values, in place; returns `module`.

    Matrices and conv kernels get a variance-preserving uniform init (std 1/sqrt(fan_in)); vectors named
    like biases get N(0, 0.2); every other vector (norm weights, LayerScale gammas, ...) gets 1 + N(0, 0.2)
    times a random sign, so neither identity nor zero hides anything. Names containing any string in
    `skip` are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if not p.is_floating_point() or any(s in name for s in skip):
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            bound = math.sqrt(3.0 / fan_in)
            new = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        elif name.endswith("bias") or "bias" in name.split(".")[-1]:
            new = torch.randn(p.shape, generator=gen) * 0.2
        else:
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            new = (1 + torch.randn(p.shape, generator=gen) * 0.2) * sign
        p.copy_(new.to(p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number that is scale-free and strict at the worst element."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def manifest(name: str) -> dict:
    """Load tests/manifests/<name>.json: {key: shape} of a released checkpoint, read off the real file."""
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests", name + ".json")
    with open(path) as f:
        return json.load(f)
