"""Small random instances of diffusers transformers that no preset serves, and one call's inputs for each.

    model, call = tiny.build("QwenImageTransformer2DModel")   # or the family name, "qwenimage"
    out = model(**call(500.0))                                 # call(t): the keyword arguments at timestep t

Hidden size 32, two blocks (one of each kind): what ``python -m taylorseer.attach.discover <Class>`` traces and
verifies when it is given no folder, and what the tests run a 30-step loop on.
"""

from __future__ import annotations

import torch

B = 1


def _r(*shape):
    return torch.randn(*shape)


def _qwenimage():
    import diffusers

    m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    x, e = _r(B, 16, 16), _r(B, 7, 32)
    return m, lambda t: dict(hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=torch.ones(B, 7),
                             timestep=torch.full((B,), t / 1000), img_shapes=[(1, 4, 4)] * B, return_dict=False)


def _ltx():
    import diffusers

    m = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                             attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                             caption_channels=32)
    x, e = _r(B, 2 * 4 * 4, 8), _r(B, 7, 32)
    return m, lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.full((B,), t),
                             encoder_attention_mask=torch.ones(B, 7), num_frames=2, height=4, width=4,
                             return_dict=False)


def _sana():
    import diffusers

    m = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                         cross_attention_dim=32, caption_channels=32, sample_size=8)
    x, e = _r(B, 4, 8, 8), _r(B, 7, 32)
    return m, lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.full((B,), t), return_dict=False)


def _lumina2():
    import diffusers

    m = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                                            multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
                                            cap_feat_dim=32)
    x, e = _r(B, 4, 8, 8), _r(B, 7, 32)
    return m, lambda t: dict(hidden_states=x, timestep=torch.full((B,), t / 1000), encoder_hidden_states=e,
                             encoder_attention_mask=torch.ones(B, 7, dtype=torch.bool), return_dict=False)


def _cogview4():
    import diffusers

    m = diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                             time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8,
                                             rope_axes_dim=(16, 16))
    x, e = _r(B, 4, 8, 8), _r(B, 8, 32)
    size = torch.tensor([[64.0, 64.0]] * B)
    return m, lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.full((B,), t),
                             original_size=size, target_size=size, crop_coords=torch.zeros(B, 2), return_dict=False)


def _skyreels():
    import diffusers

    m = diffusers.SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                               in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                               num_layers=2, rope_max_seq_len=32)
    x, e = _r(B, 4, 2, 8, 8), _r(B, 7, 32)
    return m, lambda t: dict(hidden_states=x, timestep=torch.full((B,), t), encoder_hidden_states=e,
                             return_dict=False)


def _flux2():
    import diffusers

    m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    x, e = _r(B, 16, 16), _r(B, 7, 32)
    img_ids = torch.zeros(B, 16, 4)
    img_ids[..., 2] = torch.arange(16).div(4, rounding_mode="floor")
    img_ids[..., 3] = torch.arange(16) % 4
    txt_ids = torch.zeros(B, 7, 4)
    return m, lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.full((B,), t / 1000),
                             img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full((B,), 3.5), return_dict=False)


def _hunyuan15():
    import diffusers

    m = diffusers.HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                                   attention_head_dim=16, num_layers=2, num_refiner_layers=1,
                                                   mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=24,
                                                   image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v")
    x, e, e2 = _r(B, 9, 2, 4, 4), _r(B, 7, 32), _r(B, 5, 24)
    return m, lambda t: dict(hidden_states=x, timestep=torch.full((B,), t), encoder_hidden_states=e,
                             encoder_attention_mask=torch.ones(B, 7), encoder_hidden_states_2=e2,
                             encoder_attention_mask_2=torch.ones(B, 5), image_embeds=torch.zeros(B, 4, 16),
                             return_dict=False)


def _hidream():
    import diffusers

    m = diffusers.HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                                 caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=2,
                                                 num_activated_experts=1, axes_dims_rope=(8, 4, 4),
                                                 max_resolution=(16, 16), llama_layers=[0, 1])
    x = _r(B, 4, 8, 8)
    t5, llama, pooled = _r(B, 7, 32), _r(2, B, 5, 16), _r(B, 32)
    return m, lambda t: dict(hidden_states=x, timesteps=torch.full((B,), t), encoder_hidden_states_t5=t5,
                             encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)


# family -> (diffusers class, builder)
CASES = {"qwenimage": ("QwenImageTransformer2DModel", _qwenimage), "ltx": ("LTXVideoTransformer3DModel", _ltx),
         "sana": ("SanaTransformer2DModel", _sana), "lumina2": ("Lumina2Transformer2DModel", _lumina2),
         "cogview4": ("CogView4Transformer2DModel", _cogview4),
         "skyreels": ("SkyReelsV2Transformer3DModel", _skyreels), "flux2": ("Flux2Transformer2DModel", _flux2),
         "hunyuan15": ("HunyuanVideo15Transformer3DModel", _hunyuan15),
         "hidream": ("HiDreamImageTransformer2DModel", _hidream)}




def find(name: str) -> str | None:
    """The family of a family name or diffusers class name, or None."""
    for family, (cls, _) in CASES.items():
        if name in (family, cls):
            return family
    return None


def build(name: str, seed: int = 0):
    """``(model, call)``: a small random instance (eval mode, fp32, CPU) and ``call(t) -> kwargs``."""
    family = find(name)
    if family is None:
        raise ValueError(f"no small instance known for {name!r}; known: {[c for c, _ in CASES.values()]}")
    torch.manual_seed(seed)
    model, call = CASES[family][1]()
    return model.eval(), call
