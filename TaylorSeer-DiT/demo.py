"""The out-of-the-box demo: no cache vs FORA (reuse) vs TaylorSeer (forecast) on the bundled digits DiT.

    bash scripts/demo.sh                               # ~1-2 min on 2 CPU cores
    bash scripts/demo.sh num_samples=500 intervals=[4,5] orders=[1,2,3]

For every interval N and method it samples the same seeds and reports, in one table: full steps,
FLOPs compression, measured wall speedup, fidelity to the uncached samples of the same seeds (PSNR
per sample, FID between the cached and uncached sets) and absolute quality (the bundled
classifier's accuracy on the intended class, digits FID against real digits). Two questions kept
apart: a blurrier model can look "better" to a classifier while drifting from what the model
really generates; fidelity is what a cache must preserve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig
from taylorseer.harness import runs, settings
from taylorseer.harness.settings import Setting
from taylorseer_eval.fid import frechet_distance
from taylorseer_eval.fidelity import finite_mean, psnr
from taylorseer_eval.report import markdown_table, quality_vs_speedup_plot, write_csv

from .cache import attach_cache
from .diffusion import SPACINGS, GaussianDiffusion
from .digits import load_classifier, load_split
from .flops import count_flops
from .pipeline import find_checkpoint, load_dit, sample, to_images
from .sample import CONFIG_DIR, MODEL_SCHEMA

CONFIG_NAME = "demo"  # configs/demo.yaml

COLUMNS = ["method", "N", "O", "full_steps", "flops_compression", "wall_speedup", "psnr_vs_uncached",
           "fid_vs_uncached", "accuracy", "fid_vs_real"]
HEADERS = ["method", "N", "O", "full steps", "FLOPs compr.", "wall speedup", "PSNR vs uncached (dB)",
           "FID vs uncached", "accuracy", "digits FID"]


@dataclass(frozen=True)
class Method:
    name: str
    config: CacheConfig

    @property
    def row_label(self) -> str:
        return "no cache" if not self.config.enabled else f"{self.name} N={self.config.interval}"


def methods(intervals, orders, first_enhance: int) -> list[Method]:
    """No cache, then for every N: FORA (O=0) and TaylorSeer at each order."""
    out = [Method("no cache", CacheConfig(interval=1, max_order=0, first_enhance=0, enabled=False))]
    for n in intervals:
        out.append(Method("FORA", CacheConfig(interval=n, max_order=0, first_enhance=first_enhance)))
        for o in orders:
            out.append(Method(f"TaylorSeer O={o}", CacheConfig(interval=n, max_order=o, first_enhance=first_enhance)))
    return out


def generate(model, diffusion, labels: torch.Tensor, config: CacheConfig, cfg_scale: float, seed: int,
             batch_size: int) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] for ``labels`` with the cache ``config`` attached; batch b uses seed + b."""
    attach_cache(model, config, diffusion.num_steps)
    try:
        timing, images = {}, []
        with runs.timed(timing):
            for b, start in enumerate(range(0, len(labels), batch_size)):
                z = sample(model, diffusion, labels[start:start + batch_size], cfg_scale, seed + b)
                images.append(to_images(z))
        return torch.cat(images), timing["seconds"]
    finally:
        taylorseer.remove(model)


def evaluate(images, reference, labels, classifier, real_features) -> dict:
    """Fidelity to ``reference`` (uncached, same seeds) and absolute quality of ``images``."""
    with torch.no_grad():
        x = images * 2 - 1  # back to the model's [-1, 1]
        features, logits = classifier.features(x), classifier(x)
        ref_features = classifier.features(reference * 2 - 1)
    return {
        "psnr_vs_uncached": finite_mean(psnr(images, reference)),
        "fid_vs_uncached": frechet_distance(features, ref_features),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "fid_vs_real": frechet_distance(features, real_features),
    }


def side_by_side(rows: list[tuple[str, torch.Tensor]], per_row: int = 10, scale: int = 4) -> Image.Image:
    """One labelled row of samples per method (same seeds in every column)."""
    size, label_w = 8 * scale, 130
    canvas = Image.new("L", (label_w + per_row * (size + 2), len(rows) * (size + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (size + 2)
        draw.text((4, y + size // 2 - 5), label, fill=0)
        for c, img in enumerate(images[:per_row]):
            tile = Image.fromarray((img[0] * 255).round().byte().numpy()).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (size + 2), y))
    return canvas


SCHEMA = {
    **MODEL_SCHEMA,
    "num_samples": Setting("int", minimum=10, hint="FID needs a set"),
    "num_steps": Setting("int", minimum=1),
    "spacing": Setting("str", choices=SPACINGS),
    "cfg_scale": Setting("float", minimum=1.0),
    "batch_size": Setting("int", minimum=1),
    "intervals": Setting("list"),
    "orders": Setting("list"),
    "first_enhance": Setting("int", minimum=0),
}


def main(cfg: DictConfig) -> list[dict]:
    settings.check_app(cfg, SCHEMA, "demo", "dit", CONFIG_DIR)
    first_enhance = int(cfg.first_enhance)
    all_methods = methods(list(cfg.intervals), list(cfg.orders), first_enhance)  # validates N, O, warm-up
    out_dir = Path(cfg.out_root) / "demo" / f"digits-{cfg.num_samples}samples-{cfg.num_steps}steps-seed{cfg.seed}"
    torch.manual_seed(cfg.seed)
    model = load_dit(find_checkpoint(cfg.model.checkpoint, cfg.model.name, cfg.model.image_size))
    classifier = load_classifier()
    data = load_split()
    with torch.no_grad():
        real_features = classifier.features(torch.cat([data["train_x"], data["test_x"]]))
    diffusion = GaussianDiffusion(cfg.num_steps, "ddim", spacing=cfg.spacing)
    labels = torch.arange(cfg.num_samples) % 10
    # warm-up: first calls pay one-off costs that would bias the first timing (allocations; the fused forecast
    # kernel of each order is generated and compiled on its first use), so every order runs once untimed
    first_of_order = {m.config.max_order if m.config.enabled else -1: m for m in all_methods}
    for method in first_of_order.values():
        generate(model, diffusion, labels[:cfg.batch_size], method.config, cfg.cfg_scale, cfg.seed, cfg.batch_size)

    # The uncached baseline is timed at the start, in the middle and at the end; speedups use the
    # median, and the table header shows the spread, since wall time drifts on a shared machine.
    results, rows, grid_rows, baseline_seconds = {}, [], [], []
    middle = len(all_methods) // 2
    for i, method in enumerate(tqdm(all_methods, desc="demo methods", disable=not cfg.progress)):
        if i == middle:
            baseline_seconds.append(generate(model, diffusion, labels, all_methods[0].config, cfg.cfg_scale, cfg.seed,
                                             cfg.batch_size)[1])
        images, seconds = generate(model, diffusion, labels, method.config, cfg.cfg_scale, cfg.seed, cfg.batch_size)
        results[method] = (images, seconds)
        if not method.config.enabled:
            baseline_seconds.append(seconds)
    baseline_seconds.append(generate(model, diffusion, labels, all_methods[0].config, cfg.cfg_scale, cfg.seed,
                                     cfg.batch_size)[1])
    base = sorted(baseline_seconds)[len(baseline_seconds) // 2]
    reference = results[all_methods[0]][0]

    for method in all_methods:
        images, seconds = results[method]
        attach_cache(model, method.config, cfg.num_steps)
        flops = count_flops(model, method.config, cfg.num_steps, cfg.cfg_scale)
        taylorseer.remove(model)
        row = {"method": method.name, "N": method.config.interval if method.config.enabled else 1,
               "O": method.config.max_order if method.config.enabled else None,
               "full_steps": flops.full_steps, "flops_compression": flops.compression,
               "wall_speedup": base / seconds, "seconds": seconds}
        row.update(evaluate(images, reference, labels, classifier, real_features))
        rows.append(row)
        grid_rows.append((method.row_label if method.name in ("no cache", "FORA") else
                          f"{method.name.replace('TaylorSeer', 'TS')} N={method.config.interval}", images))

    table = markdown_table(rows, COLUMNS, HEADERS)
    spread = max(baseline_seconds) / min(baseline_seconds) - 1
    header = (f"Bundled digits DiT, {cfg.num_samples} samples, DDIM {cfg.num_steps} steps, cfg {cfg.cfg_scale}, "
              f"warm-up {first_enhance}; uncached {base:.2f} s (median of {len(baseline_seconds)} timings, spread "
              f"{spread:.1%})\n\n")
    runs.write_text(out_dir / "table.md", header + table)
    write_csv(out_dir / "table.csv", rows, COLUMNS + ["seconds"])
    runs.save_image(out_dir / "side_by_side.png", side_by_side(grid_rows))
    plot_rows = [r for r in rows if r["method"] != "no cache"]
    quality_vs_speedup_plot(out_dir / "psnr_vs_speedup.png", plot_rows, "wall_speedup", "psnr_vs_uncached",
                            "method", label="N", title="Fidelity to the uncached samples (same seeds)",
                            xlabel="measured wall speedup (x)", ylabel="PSNR vs uncached (dB)")
    quality_vs_speedup_plot(out_dir / "fid_vs_speedup.png", plot_rows, "wall_speedup", "fid_vs_real", "method",
                            label="N", title="Digits FID against real digits", xlabel="measured wall speedup (x)",
                            ylabel="digits FID (lower is better)")
    runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    print(header + table)
    print(f"[demo] table, side-by-side grid and plots in {out_dir}")
    return rows


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors("demo", also=(AssertionError,))  # the scripts assert their arguments with messages
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
