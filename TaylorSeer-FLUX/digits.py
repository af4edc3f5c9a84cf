"""The bundled FLUX-architecture model: rectified flow on scikit-learn's digits, as a whole tiny FluxPipeline.

    bash scripts/train_digits_flux.sh                 # VAE, then transformer -> assets/digits_flux/ (resumable)
    bash scripts/sample_flux.sh model=digits_flux     # FLUX's main command on a CPU, out of the box

Every component is diffusers'/transformers' own class, only small, so the folder loads through the same
``FluxPipeline.from_pretrained`` as FLUX.1-dev and the cache attaches to the same ``FluxTransformer2DModel``:

* images: the 8x8 digits (80% training split, the digits DiT's), upsampled bilinearly to 16x16, one channel
  in [-1, 1];
* ``vae``: an ``AutoencoderKL`` (2 levels: 16x16x1 -> 8x8x4), trained first (reconstruction + a small KL),
  its ``shift_factor``/``scaling_factor`` set so the training latents have mean 0 and std 1, as FLUX's are;
* ``text_encoder``/``text_encoder_2`` (CLIP, T5) and their tokenizers: small, random, frozen, built offline
  from in-memory vocabularies; the prompt names the digit (``"digit 7"``), so the class reaches the
  transformer the way FLUX's prompts do (T5 sequence + CLIP pooled vector);
* ``transformer``: ``FluxTransformer2DModel`` (2 double + 4 single blocks, 4 heads x 32, no guidance
  embedder), trained with rectified flow: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0`` (what
  ``FlowMatchEulerDiscreteScheduler.step`` integrates), ``s`` logit-normal as in SD3/FLUX;
* ``scheduler``: FLUX.1-dev's scheduler config (Euler, shifted sigmas with resolution-dependent shift).

The 8x8 latent packs into 4x4 = 16 image tokens (as many as the digits DiT has), plus 16 text tokens.
Seeded; a checkpoint is written every ``save_every`` steps (atomically) and training resumes from it after a
kill; ``assets/digits_flux.json`` records the architecture, the training config and the losses.
"""

from __future__ import annotations

import copy
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from taylorseer.harness import runs
from taylorseer.harness.training import load_resume, parse_overrides, save_resume, train_steps, warmup_cosine_lr
from taylorseer_dit.digits import load_split

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PIPELINE_DIR = ASSETS / "digits_flux"
RECORD = ASSETS / "digits_flux.json"
IMAGE_SIZE = 16
TEXT_TOKENS = 8

TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                   axes_dims_rope=(8, 12, 12))
VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
           latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE, use_quant_conv=False,
           use_post_quant_conv=False)
# FLUX.1-dev's scheduler/scheduler_config.json: 16 image tokens give the shift exp(mu) ~ 1.58.
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def prompt_of(label: int) -> str:
    """The prompt of class ``label``: it names the digit."""
    return f"digit {int(label)}"


def label_of(prompt: str) -> int:
    """The class a prompt of :func:`prompt_of` names (for the digits metric of FLUX runs)."""
    found = re.fullmatch(r"\s*digit\s+([0-9])\s*", prompt)
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit: the digits FLUX model's prompts are 'digit 0'..'digit 9'")
    return int(found.group(1))


def upsample(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) digits in [-1, 1] -> (N, 1, 16, 16), bilinear."""
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def downsample(images: torch.Tensor) -> torch.Tensor:
    """(N, C, 16, 16) -> (N, C, 8, 8) by 2x2 averages: what the digits classifier reads."""
    return F.avg_pool2d(images, kernel_size=IMAGE_SIZE // 8)


# ------------------------------------------------------------------------------------------ components
def clip_tokenizer():
    """A byte-level CLIP tokenizer over single characters (sorted: the same ids in every process)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=TEXT_TOKENS)


def t5_tokenizer():
    """A unigram T5 tokenizer over characters and word starts."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TEXT_TOKENS)


def build_pipeline(seed: int = 0):
    """The untrained pipeline (fp32, CPU, eval mode): random frozen text encoders, VAE and transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    width = TRANSFORMER["pooled_projection_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TRANSFORMER["joint_attention_dim"], d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**VAE),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=FluxTransformer2DModel(**TRANSFORMER))
    for component in (pipe.vae, text_encoder, text_encoder_2, pipe.transformer):
        component.eval().requires_grad_(False)  # built from configs they start in train mode
    return pipe


@torch.no_grad()
def text_conditions(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T5 sequences (10, L, D), CLIP pooled (10, P), text ids) of the ten prompts, as sampling encodes them."""
    return pipe.encode_prompt([prompt_of(d) for d in range(10)], device="cpu", max_sequence_length=TEXT_TOKENS)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C), FluxPipeline's packing."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def image_ids(latent_size: int) -> torch.Tensor:
    """FluxPipeline's image position ids for a latent of ``latent_size`` x ``latent_size``."""
    ids = torch.zeros(latent_size // 2, latent_size // 2, 3)
    ids[..., 1] += torch.arange(latent_size // 2)[:, None]
    ids[..., 2] += torch.arange(latent_size // 2)[None, :]
    return ids.reshape(-1, 3)


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    vae_steps: int = 1500
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4  # weight of the KL term: keeps the latent space smooth, reconstruction stays sharp
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr: float = 1e-5
    ema: float = 0.999
    seed: int = 0
    save_every: int = 250
    out: str = str(PIPELINE_DIR)


def train(cfg: TrainConfig) -> dict:
    """Both stages, resumable: ``<out>.resume.pt`` holds the stage, step, weights, optimiser and generator."""
    out = Path(cfg.out)
    resume_path = out.with_suffix(".resume.pt")
    pipe = build_pipeline(cfg.seed)
    data = load_split()
    images = upsample(data["train_x"])
    labels = data["train_y"]
    g = torch.Generator().manual_seed(cfg.seed)
    state = load_resume(resume_path)
    record: dict = {} if state is None else state["record"]
    if state is not None:
        print(f"[train_digits_flux] resuming: {state['stage']} at step {state['step']}")

    # ---- stage 1: the VAE (encoder + decoder), reconstruction + KL
    vae = pipe.vae
    if state is None or state["stage"] == "vae":
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        start, losses = 0, []
        if state is not None:
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["opt"])
            g.set_state(state["generator"])
            start, losses = state["step"], state["losses"]

        def vae_loss(_step: int) -> torch.Tensor:
            x = images[torch.randint(len(images), (cfg.vae_batch_size,), generator=g)]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            recon = vae.decode(z).sample
            return F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean() / x[0].numel()

        def save_vae(step: int) -> None:
            save_resume(resume_path, dict(stage="vae", step=step, vae=vae.state_dict(), opt=opt.state_dict(),
                                          generator=g.get_state(), losses=losses, record=record))

        train_steps(vae, opt, vae_loss, start=start, steps=cfg.vae_steps, losses=losses,
                    lr_at=lambda step: warmup_cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 100, cfg.vae_lr / 100),
                    save=save_vae, save_every=cfg.save_every, desc="train digits VAE")
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            recon = vae.decode(vae.encode(images).latent_dist.mean).sample
            mean = vae.encode(images).latent_dist.mean
        record["vae"] = dict(steps=cfg.vae_steps, final_loss_last100=sum(losses[-100:]) / len(losses[-100:]),
                             recon_psnr_db=float(10 * torch.log10(4 / F.mse_loss(recon.clamp(-1, 1), images))),
                             latent_mean=float(mean.mean()), latent_std=float(mean.std()))
        # FLUX's latent normalisation: the transformer sees (z - shift) * scale, mean 0 and std 1 on the data.
        vae.register_to_config(shift_factor=float(mean.mean()), scaling_factor=float(1 / mean.std()))
        state = None
        save_resume(resume_path, dict(stage="transformer", step=0, vae=vae.state_dict(),
                                      vae_config=dict(vae.config), generator=g.get_state(), record=record))
        print(f"[train_digits_flux] VAE: {record['vae']}")
    else:
        vae.load_state_dict(state["vae"])
        vae.register_to_config(shift_factor=state["vae_config"]["shift_factor"],
                               scaling_factor=state["vae_config"]["scaling_factor"])

    # ---- stage 2: the transformer, rectified flow on the (normalised, packed) latents
    with torch.no_grad():
        latents = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    x_all = pack(latents)
    prompt_embeds, pooled, text_ids = text_conditions(pipe)
    img_ids = image_ids(latents.shape[-1])
    model = pipe.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = load_resume(resume_path)
    start, losses = 0, []
    if state is not None and state["stage"] == "transformer" and "model" in state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
    if state is not None:
        g.set_state(state["generator"])
    t0 = time.time()

    def flow_loss(_step: int) -> torch.Tensor:
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))  # logit-normal(0, 1), SD3's default
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        v = model(hidden_states=xs, encoder_hidden_states=prompt_embeds[y], pooled_projections=pooled[y],
                  timestep=s, img_ids=img_ids, txt_ids=text_ids, return_dict=False)[0]
        return F.mse_loss(v, noise - x0)

    def save_transformer(step: int) -> None:
        save_resume(resume_path, dict(stage="transformer", step=step, vae=vae.state_dict(),
                                      vae_config=dict(vae.config), model=model.state_dict(), ema=ema.state_dict(),
                                      opt=opt.state_dict(), generator=g.get_state(), losses=losses, record=record))

    train_steps(model, opt, flow_loss, start=start, steps=cfg.steps, losses=losses,
                lr_at=lambda step: warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr),
                save=save_transformer, save_every=cfg.save_every, desc="train digits FLUX", ema=ema,
                ema_decay=cfg.ema, clip=1.0)

    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    record.update(transformer=dict(steps=cfg.steps, final_loss_last200=sum(losses[-200:]) / len(losses[-200:]),
                                   first_loss_first50=sum(losses[:50]) / min(len(losses), 50),
                                   parameters=sum(p.numel() for p in ema.parameters())),
                  architecture=dict(transformer=TRANSFORMER, vae=VAE, scheduler=SCHEDULER, image_size=IMAGE_SIZE,
                                    text_tokens=TEXT_TOKENS),
                  train=asdict(cfg), train_seconds_this_session=time.time() - t0,
                  data="sklearn load_digits, 80% train split (seed 0), 8x8 upsampled bilinearly to 16x16, [-1, 1]",
                  prompts=[prompt_of(d) for d in range(10)])
    _save_pipeline(pipe, out)
    runs.write_json(RECORD if out == PIPELINE_DIR else out.with_suffix(".json"), record)
    resume_path.unlink(missing_ok=True)
    print(f"[train_digits_flux] saved the pipeline to {out} (loss over the last 200 steps "
          f"{record['transformer']['final_loss_last200']:.4f})")
    return record


def _save_pipeline(pipe, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then swap it in: never a half-written folder."""
    import shutil

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m taylorseer_flux.digits key=value ...``: the VAE, then the transformer."""
    cfg = TrainConfig()
    parse_overrides(cfg, argv)
    torch.set_num_threads(1)  # a shared machine: one core is plenty for a model this size
    train(cfg)


if __name__ == "__main__":
    main()
