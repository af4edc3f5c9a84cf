"""Tiny random diffusers transformers that no preset serves, and one call's inputs for each (hidden 32, 2 blocks).

    model, call = build("qwenimage")         # call(t) -> the keyword arguments of one denoiser call at timestep t
"""

from __future__ import annotations

import torch

from taylorseer.attach import tiny

CASES = tiny.CASES


def build(name: str, seed: int = 0):
    return tiny.build(name, seed)


def sample(model, call, steps: int = 12) -> torch.Tensor:
    """A flow loop: x <- x + dt * v, the model's prediction as the velocity (shapes permitting)."""
    first = call(1000.0)
    x = first["hidden_states"].clone()
    with torch.no_grad():
        for i in range(steps):
            t = 1000.0 * (1 - i / steps)
            kwargs = dict(call(t), hidden_states=x)
            v = model(**kwargs)[0]
            if v.shape == x.shape:
                x = x - v / steps
            else:  # HunyuanVideo 1.5: the latents are the first channels of its input
                x = torch.cat([x[:, :v.shape[1]] - v / steps, x[:, v.shape[1]:]], dim=1)
    return x
