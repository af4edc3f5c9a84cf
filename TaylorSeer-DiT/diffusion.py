"""Gaussian diffusion as DiT samples it: linear betas 1e-4..0.02 over 1000 steps, respaced to DDIM-50
(eta 0) or DDPM-250, a model that predicts epsilon plus (learned sigma) variance interpolation
values.

Respacing (which of the 1000 timesteps a sampler of N steps visits): ``"even"`` spreads N steps evenly
over [0, 999] with rounding. That is what upstream's ``sample.py --ddim-sample --num-sampling-steps 50``
builds (``create_diffusion("50")``): 0, 20, 41, 61, 82, ..., 979, 999, and the paper's FID-50k numbers
are on it; it is the default. ``"ddim"`` is DDIM's uniform stride (``"ddim50"``: 0, 20, ..., 980), which
gives other samples (rel. L2 0.18-0.23 apart on shared tiny weights); it stays selectable.

Written here from the equations of Ho et al. (2020), Song et al. (DDIM, 2021) and Nichol & Dhariwal
(2021); all schedule arithmetic in float64 as the originals do.

Each sampling step calls the model once, so the step index the cache sees is the loop index.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

StepCallback = Callable[[int, torch.Tensor], None]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which of the original timesteps a respaced sampler visits, ascending.

    ``"ddimN"`` takes every (num_timesteps // N)-th step starting at 0 (DDIM's uniform stride); an
    integer N spreads N steps evenly over [0, num_timesteps - 1] with rounding (DiT's DDPM-250).
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        n = int(spacing[len("ddim"):])
        for stride in range(1, num_timesteps):
            steps = list(range(0, num_timesteps, stride))
            if len(steps) == n:
                return steps
        raise ValueError(f"cannot take exactly {n} DDIM steps out of {num_timesteps}")
    n = int(spacing)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"num_steps={n} must be in [1, {num_timesteps}]")
    if n == 1:
        return [0]
    frac = (num_timesteps - 1) / (n - 1)
    return sorted({round(i * frac) for i in range(n)})


SPACINGS = ("even", "ddim")


class GaussianDiffusion:
    """A respaced diffusion process; ``timestep_map[i]`` is the original timestep of respaced step i.

    ``spacing``: ``"even"`` (upstream's default for both samplers) or ``"ddim"`` (stride 1000/N).
    """

    def __init__(self, num_steps: int, sampler: str = "ddim", num_timesteps: int = 1000, spacing: str = "even"):
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler={sampler!r} is invalid: expected 'ddim' or 'ddpm'")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing={spacing!r} is invalid: expected one of {list(SPACINGS)} (even: upstream's)")
        self.sampler, self.num_steps, self.spacing = sampler, num_steps, spacing
        use = space_timesteps(num_timesteps, f"ddim{num_steps}" if spacing == "ddim" else num_steps)
        base_acp = np.cumprod(1.0 - linear_betas(num_timesteps))
        betas, last = [], 1.0
        for t in use:
            betas.append(1 - base_acp[t] / last)
            last = base_acp[t]
        self.timestep_map = np.array(use, dtype=np.int64)
        self.betas = np.array(betas, dtype=np.float64)
        acp = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.sqrt_recip_acp = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_acp = np.sqrt(1.0 / acp - 1)
        posterior_var = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
        # log of the posterior variance, clipped because it is 0 at the first step
        self.posterior_log_var_clipped = np.log(np.append(posterior_var[1], posterior_var[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - acp)

    # --------------------------------------------------------------------------------- training
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (t indexes this process's steps)."""
        acp = _gather(self.alphas_cumprod, t, x0)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    # --------------------------------------------------------------------------------- sampling
    def _predict(self, model: Callable, x: torch.Tensor, i: int, model_kwargs: dict):
        t_model = torch.full((x.shape[0],), int(self.timestep_map[i]), device=x.device, dtype=torch.long)
        out = model(x, t_model, **model_kwargs)
        C = x.shape[1]
        eps, var_values = (out[:, :C], out[:, C:]) if out.shape[1] == 2 * C else (out, None)
        x0 = _scalar(self.sqrt_recip_acp[i], x) * x - _scalar(self.sqrt_recipm1_acp[i], x) * eps
        return eps, var_values, x0

    def ddim_step(self, model, x, i, model_kwargs):
        # eta = 0: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps (Song et al. eq. 12)
        _, _, x0 = self._predict(model, x, i, model_kwargs)
        eps = (_scalar(self.sqrt_recip_acp[i], x) * x - x0) / _scalar(self.sqrt_recipm1_acp[i], x)
        prev = self.alphas_cumprod_prev[i]
        return x0 * _scalar(np.sqrt(prev), x) + _scalar(np.sqrt(1 - prev), x) * eps

    def ddpm_step(self, model, x, i, model_kwargs, generator):
        _, var_values, x0 = self._predict(model, x, i, model_kwargs)
        mean = _scalar(self.posterior_mean_coef1[i], x) * x0 + _scalar(self.posterior_mean_coef2[i], x) * x
        if var_values is None:  # fixed small variance
            log_var = torch.full_like(x, self.posterior_log_var_clipped[i])
        else:  # learned interpolation between beta_tilde and beta (Nichol & Dhariwal eq. 15)
            frac = (var_values + 1) / 2
            min_log, max_log = self.posterior_log_var_clipped[i], np.log(self.betas[i])
            log_var = frac * max_log + (1 - frac) * min_log
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * log_var) * draw_noise(x.shape, generator, x.device, x.dtype)

    @torch.no_grad()
    def sample_loop(self, model: Callable, noise: torch.Tensor, model_kwargs: dict | None = None,
                    generator: torch.Generator | None = None, progress: bool = False,
                    callback: StepCallback | None = None) -> torch.Tensor:
        """Run the reverse process from ``noise``; one model call per step (loop index = cache step)."""
        x, model_kwargs = noise, model_kwargs or {}
        for step, i in enumerate(tqdm(range(self.num_steps - 1, -1, -1), disable=not progress, desc="sampling")):
            if self.sampler == "ddim":
                x = self.ddim_step(model, x, i, model_kwargs)
            else:
                x = self.ddpm_step(model, x, i, model_kwargs, generator)
            if callback is not None:
                callback(step, x)
        return x


def draw_noise(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise of ``shape`` from ``generator``, or from a list of generators, one per sample.

    A list draws each sample's noise from its own stream (on the CPU, so the same seed gives the same noise
    on any device): then a sample does not depend on the batch it is in, its place there, or the world size.
    CFG batches (cond and uncond halves) hold each sample twice: the halves repeat the streams.
    """
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    per_sample = (1, *shape[1:])
    noise = [torch.randn(per_sample, generator=g, dtype=torch.float32) for g in generator]
    noise = torch.cat(noise * (shape[0] // len(noise)))
    return noise.to(device=device, dtype=dtype)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.from_numpy(values).to(device=t.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))
