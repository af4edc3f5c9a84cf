"""The hand-written attachments as they were before the presets (frozen copies, the oracle of test_presets.py).

FLUX, HunyuanVideo and DiT became presets of the core's block descriptions; these are the forwards they
replaced, kept verbatim in behaviour (same core block ops, same cached modules), so the tests can check that
each preset gives the same outputs bit for bit and runs the same ops on a forecast step.
"""

from __future__ import annotations

import torch.nn.functional as F

import taylorseer
from taylorseer.attach.spec import modulation_chunk
from taylorseer.core.kernels import gated_add


def _clip_fp16(x):
    import torch

    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# ------------------------------------------------------------------------------------------------ FLUX
def flux_double(forecast_text=False):
    def factory(block, original, cache, name):
        attn_name, ff_name, ff_context_name = f"{name}.attn", f"{name}.ff", f"{name}.ff_context"

        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            if cache.is_full:
                return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            emb = F.silu(temb)
            gate_msa = modulation_chunk(block.norm1.linear, emb, 6, 2).unsqueeze(1)
            gate_mlp = modulation_chunk(block.norm1.linear, emb, 6, 5).unsqueeze(1)
            attn = cache.terms(attn_name)
            out = gated_add(hidden_states, gate_msa, attn[0])
            out = gated_add(hidden_states, gate_mlp, cache.terms(ff_name)[0], out=out)
            for c, factor in attn[2] if len(attn) == 3 else ():
                out.add_(factor, alpha=c)
            if forecast_text:
                c_gate_msa = modulation_chunk(block.norm1_context.linear, emb, 6, 2).unsqueeze(1)
                c_gate_mlp = modulation_chunk(block.norm1_context.linear, emb, 6, 5).unsqueeze(1)
                text = gated_add(encoder_hidden_states, c_gate_msa, attn[1])
                text = gated_add(encoder_hidden_states, c_gate_mlp, cache.terms(ff_context_name)[0], text)
                encoder_hidden_states = _clip_fp16(text)
            return encoder_hidden_states, out

        return forward

    return factory


def flux_single(forecast_text=False):
    def factory(block, original, cache, name):
        img_name, txt_name = f"{name}.img", f"{name}.txt"

        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            if not cache.config.enabled:
                return original(*args)
            text_len = encoder_hidden_states.shape[1]
            if cache.is_full:
                def record(_module, _inputs, output):
                    cache.update(img_name, output[:, text_len:])
                    if forecast_text:
                        cache.update(txt_name, output[:, :text_len])

                handle = block.proj_out.register_forward_hook(record)
                try:
                    return original(*args)
                finally:
                    handle.remove()
            gate = modulation_chunk(block.norm.linear, F.silu(temb), 3, 2).unsqueeze(1)
            hidden_states = _clip_fp16(gated_add(hidden_states, gate, cache.terms(img_name)[0]))
            if forecast_text:
                text = gated_add(encoder_hidden_states, gate, cache.terms(txt_name)[0])
                encoder_hidden_states = _clip_fp16(text)
            return encoder_hidden_states, hidden_states

        return forward

    return factory


def apply_flux(transformer, config, num_steps=None, forecast_text=False):
    double = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    single = [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    overrides = {name: flux_single(forecast_text) for name in single}
    overrides.update({name: flux_double(forecast_text) for name in double})
    modules = ["transformer_blocks.*.attn", "transformer_blocks.*.ff"]
    if forecast_text:
        modules.append("transformer_blocks.*.ff_context")
    return taylorseer.apply(transformer, config, modules=modules, overrides=overrides, num_steps=num_steps)


# ---------------------------------------------------------------------------------------- HunyuanVideo
def hunyuan_single(block, original, cache, name):
    branch_name = f"{name}.proj_out"
    norm = block.norm

    def forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        if cache.is_full:
            return original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        gate = modulation_chunk(norm.linear, norm.silu(temb), 3, 2).unsqueeze(1)
        (terms,) = cache.terms(branch_name)
        n_video = hidden_states.shape[1]
        video = gated_add(hidden_states, gate, [(c, f[:, :n_video]) for c, f in terms])
        text = gated_add(encoder_hidden_states, gate, [(c, f[:, n_video:]) for c, f in terms])
        return video, text

    return forward


def apply_hunyuan(transformer, config, num_steps=None, single_attention=True):
    patterns = ["transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context"]
    patterns += (["single_transformer_blocks.*.attn"] if single_attention else []) + [
        "single_transformer_blocks.*.proj_out"]
    count = len(transformer.single_transformer_blocks)
    single = {f"single_transformer_blocks.{i}": hunyuan_single for i in range(count)}
    return taylorseer.apply(transformer, config, modules=patterns, overrides=single, num_steps=num_steps)


# ------------------------------------------------------------------------------------------------- DiT
def dit_block(block, original, cache, name):
    ada = block.adaLN_modulation[1]

    def forward(x, c):
        if cache.is_full:
            return original(x, c)
        emb = F.silu(c)
        out = gated_add(x, modulation_chunk(ada, emb, 6, 2).unsqueeze(1), cache.terms(f"{name}.attn")[0])
        return gated_add(x, modulation_chunk(ada, emb, 6, 5).unsqueeze(1), cache.terms(f"{name}.mlp")[0], out=out)

    return forward


def apply_dit(model, config, num_steps=None):
    blocks = {f"blocks.{i}": dit_block for i in range(len(model.blocks))}
    return taylorseer.apply(model, config, modules=("blocks.*.attn", "blocks.*.mlp"), overrides=blocks,
                            num_steps=num_steps)
