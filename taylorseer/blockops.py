"""Building blocks for the forecast-step forward of a transformer block.

On a forecast step a block's cached branches do not run, so all that is left of an adaLN-Zero block
is ``x + gate * branch`` per branch. These helpers make that cost almost nothing: only the gate rows
of the modulation matrix are read, and the forecast is folded into the gated residual add instead of
being materialised. Used by the DiT, FLUX and HunyuanVideo block forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import fused_gated_add
from .store import ScaledFactor


def gated_add(residual: torch.Tensor, gate: torch.Tensor, terms: list[tuple[float, torch.Tensor | ScaledFactor]],
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + gate * sum_i c_i F_i`` (into ``out`` when given, which then holds the residual).

    A factor may be 8-bit (:class:`taylorseer.store.ScaledFactor`, ``F_i = q_i * s_i``): the fused kernel
    dequantises it inside its pass, the chain before its ``addcmul``.

    What a block does with a forecast branch (gate, then residual add), without materialising the
    forecast. One pass over the tokens with a fused kernel (:mod:`taylorseer.fused`: inductor's C++
    loop on a CPU by default, Triton on CUDA on request; order 1 reads the residual and each factor
    once, 4 tensor passes instead of the addcmul chain's 6), the chain of one ``addcmul`` per factor
    otherwise. Same values up to float rounding.
    """
    return fused_gated_add(residual, gate, terms, out)


def modulation_chunk(linear: torch.nn.Module, x: torch.Tensor, chunks: int, index: int) -> torch.Tensor:
    """``linear(x).chunk(chunks, dim=1)[index]``, reading only that chunk's rows of a plain ``nn.Linear``.

    A forecast step needs the gates alone, a third of each modulation matrix: on FLUX.1-dev that is
    1.4 GB of bf16 weights read per forecast step instead of 6.4 GB. A Linear that is
    wrapped (LoRA, quantised, offloaded, cast by hooks) runs whole, as it would in the block.
    """
    plain = (type(linear) is torch.nn.Linear and "forward" not in linear.__dict__ and not linear._forward_hooks
             and not linear._forward_pre_hooks)
    if not plain:
        return linear(x).chunk(chunks, dim=1)[index]
    n = linear.out_features // chunks
    bias = None if linear.bias is None else linear.bias[index * n:(index + 1) * n]
    return F.linear(x, linear.weight[index * n:(index + 1) * n], bias)
