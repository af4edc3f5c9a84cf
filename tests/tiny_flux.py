"""A tiny random ``FluxPipeline`` built offline, for the FLUX tests.

Same classes as FLUX.1-dev (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel, their
tokenizers, FlowMatchEulerDiscreteScheduler), only small: the tests save it with ``save_pretrained`` and
load it back through the code path ``scripts/sample_flux.sh`` uses for the real weights.

Sizes: 32x32 images -> 16x16x4 latents -> 8x8 = 64 packed image tokens of 16 channels; 16 text tokens;
transformer 2 double + 2 single blocks, 2 heads x 16. The tokenizers come from small vocabularies built
in memory (sorted, so every process builds the same ids).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

IMAGE_SIZE = 32
TEXT_TOKENS = 16

# The transformer of the tiny pipeline (in_channels = 4 latent channels x 2x2 packing).
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_TOKENS)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TEXT_TOKENS)


def build_tiny_flux_pipeline(seed: int = 0):
    """A random tiny FluxPipeline in eval mode (fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TRANSFORMER["pooled_projection_dim"],
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=TINY_TRANSFORMER["pooled_projection_dim"],
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=TINY_TRANSFORMER["joint_attention_dim"],
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    # Models built from a config start in train mode (T5 dropout); from_pretrained gives eval mode.
    for component in (vae, text_encoder, text_encoder_2, transformer):
        component.eval()
    return pipe


def save_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it into ``folder`` (the FLUX.1-dev folder layout)."""
    folder = Path(folder)
    build_tiny_flux_pipeline(seed).save_pretrained(folder)
    return folder
