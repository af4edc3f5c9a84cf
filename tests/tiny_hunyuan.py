"""A tiny, random ``HunyuanVideoPipeline`` built offline, for the CPU tests.

Every component is the real class the hub pipeline uses, only small: the transformer
(``HunyuanVideoTransformer3DModel``, 2 double + 2 single blocks, 2 heads x 16, patch 2x2 like the
real one), the VAE (``AutoencoderKLHunyuanVideo``: 8x spatial, 4x temporal compression like the real
one), a Llama text encoder and a CLIP text encoder, and their tokenizers built in memory from small
vocabularies (no hub access). The tests save it with ``save_pretrained`` and load it back through
the same loader the sampling script uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

# Words the test prompts use, so different prompts give different embeddings (others map to <unk>).
PROMPT_WORDS = "a an the cat dog car bird red blue green walks runs flies on in over beach street sky at night".split()

TRANSFORMER_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=32,  # = the Llama hidden size
    pooled_projection_dim=24,  # = the CLIP hidden size
    rope_axes_dim=(4, 6, 6),  # sums to the head dim
)


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that splits the HunyuanVideo prompt template like Llama-3 does.

    The pipeline drops the first ``crop_start = 95`` tokens (the system part of the template). With
    single ``\\n`` tokens and a BOS this tokenizer gives 96 tokens before the user prompt: the prompt
    always survives the crop (one template token more is kept, harmless for a random model).
    """
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<unk>"]
    pattern = r"\w+|[^\w\s]|\n"
    words = set(re.findall(pattern, re.sub(r"<\|\w+\|>", " ", template))) | set(PROMPT_WORDS)
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}  # sorted: same ids in every process
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="<unk>", pad_token="<|end_of_text|>")


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with a character vocabulary and no merges (tokens are characters)."""
    # GPT-2/CLIP byte -> printable character table (a fixed public convention).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = sorted(chars) + sorted(c + "</w>" for c in chars) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def build_tiny_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    tokenizer = llama_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()
    tokenizer_2 = clip_tokenizer()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=24, intermediate_size=48, projection_dim=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer_2.pad_token_id,
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
    )).eval()
    transformer = HunyuanVideoTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline in the hub layout (``model_index.json`` + one folder per component)."""
    folder = Path(folder)
    build_tiny_pipeline(seed).save_pretrained(folder)
    return folder
