"""LPIPS (Zhang et al. 2018) with the ``lpips`` package, v0.1 linear heads (shipped in the package).

``d(x, y) = sum_l mean_hw || w_l * (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|) ||^2`` over the backbone's five
ReLU stages; the backbone (AlexNet by default, the usual choice for LPIPS tables; VGG16 on request) is
torchvision's ImageNet model, which torchvision downloads into ``$TORCH_HOME/hub/checkpoints``.
"""

from __future__ import annotations

import torch

from .sources import torch_hub_weights_error

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def load_lpips(net: str = "alex", device: torch.device | str = "cpu") -> torch.nn.Module:
    """``lpips.LPIPS(net=net)`` in eval mode; one clear error when torchvision cannot fetch the backbone."""
    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"--lpips {net!r} is invalid: expected one of {sorted(BACKBONE_FILES)} or none")
    try:
        model = lpips.LPIPS(net=net, version="0.1", verbose=False)
    except Exception as err:  # URLError etc. from torchvision's weight download
        raise torch_hub_weights_error(f"LPIPS needs torchvision's ImageNet {net} weights", BACKBONE_FILES[net],
                                      f"https://download.pytorch.org/models/{BACKBONE_FILES[net]}", err,
                                      "; or pass --lpips none") from err
    return model.eval().to(device)


@torch.inference_mode()
def lpips_distance(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-item LPIPS, (N,), of float images in [0, 1] shaped (N, 3, H, W)."""
    return model(x, ref, normalize=True).flatten()
