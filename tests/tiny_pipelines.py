"""Tiny random pipelines of the preset families, built offline: Wan 2.1, SD3.5, PixArt-Sigma, CogVideoX.

Same classes as the released pipelines (transformer, VAE, text encoders, tokenizers, scheduler), only small;
the tests save each with ``save_pretrained`` and load it back with ``from_pretrained``, the path real weights
take. Tokenizers come from the in-memory vocabularies of ``tiny_flux``. Transformers are the ``smoke`` sizes of
:mod:`taylorseer.attach.families` (2-3 blocks, hidden 32).

    SD3 is built as SD3.5 Medium is: block 0 has the second (dual) attention, the last block is
    context_pre_only. Its third text encoder (T5) is left out, as diffusers allows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_flux import _clip_tokenizer, _t5_tokenizer

from taylorseer.attach import families

TEXT = 16
# name -> (pipeline class, call keyword arguments besides the prompt and the step count)
CALLS = {
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=TEXT, guidance_scale=5.0,
                negative_prompt="bad"),
    "sd3": dict(height=32, width=32, max_sequence_length=TEXT, guidance_scale=5.0, negative_prompt="bad"),
    "pixart": dict(height=32, width=32, max_sequence_length=TEXT, guidance_scale=4.5, negative_prompt="bad",
                   use_resolution_binning=False, clean_caption=False),
    "cogvideox": dict(height=32, width=32, num_frames=5, max_sequence_length=TEXT, guidance_scale=6.0,
                      negative_prompt="bad"),
}
PIPELINES = {"wan": "WanPipeline", "sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline",
             "cogvideox": "CogVideoXPipeline"}


def _t5(d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    encoder = model(config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    return tokenizer, encoder


def _clip_with_projection(tokenizer, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _image_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    # two blocks: 2x downsampling, so 32x32 images are 16x16 latents
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4)


def build(name: str, seed: int = 0):
    """The tiny pipeline of family ``name`` (eval mode, fp32, CPU)."""
    import diffusers

    torch.manual_seed(seed)
    transformer = families.build(name, "smoke", seed=seed)
    if name == "wan":
        tokenizer, encoder = _t5(transformer.config.text_dim, umt5=True)  # Wan's text encoder is a UMT5
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=transformer.config.in_channels, dim_mult=[1, 1, 1, 1],
                                         num_res_blocks=1, temperal_downsample=[False, True, True])
        pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae,
                                     scheduler=diffusers.UniPCMultistepScheduler(
                                         prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    elif name == "sd3":
        tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
        width = transformer.config.pooled_projection_dim // 2  # the two CLIP projections are concatenated
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_image_vae(transformer.config.in_channels), text_encoder=_clip_with_projection(tokenizer, width),
            tokenizer=tokenizer, text_encoder_2=_clip_with_projection(tokenizer_2, width), tokenizer_2=tokenizer_2,
            text_encoder_3=None, tokenizer_3=None)
    elif name == "pixart":
        tokenizer, encoder = _t5(transformer.config.caption_channels)
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer,
                                             vae=_image_vae(transformer.config.in_channels),
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
    elif name == "cogvideox":
        tokenizer, encoder = _t5(transformer.config.text_embed_dim)
        c = transformer.config.in_channels
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=c,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
        pipe = diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                                           scheduler=diffusers.CogVideoXDDIMScheduler())
    else:
        raise ValueError(name)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def save(name: str, folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    build(name, seed).save_pretrained(folder)
    return folder


def load(name: str, folder: str | Path):
    import diffusers

    missing = dict(text_encoder_3=None, tokenizer_3=None) if name == "sd3" else {}  # not saved: None
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(folder), **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name: str, steps: int, seed: int = 0, prompt: str = "a photo of the cat", **changes) -> torch.Tensor:
    """The latents of one pipeline call (no VAE decode)."""
    kwargs = {**CALLS[name], **changes}
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="latent", **kwargs)
    return out[0] if isinstance(out, tuple) else getattr(out, "images", getattr(out, "frames", None))
