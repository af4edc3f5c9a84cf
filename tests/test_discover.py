"""Discovery (taylorseer.attach.discover), describing an unknown model, and the guards of apply()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import taylorseer
from taylorseer import BlockSpec, Branch, CacheConfig, LinearGate, presets
from taylorseer.attach import families
from taylorseer.attach.discover import discover, format_report, load_meta, main
from taylorseer.perf.opcount import count_ops

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _branches(spec: BlockSpec) -> list[tuple]:
    """What a description reads, without the dtype details (Wan's fp32 cast does not show on fp32 weights)."""
    def gate(g):
        if g is None:
            return None
        return (type(g).__name__, getattr(g, "linear", getattr(g, "table", None)), g.index, g.chunks, g.input)

    # (optional branches, FLUX's IP-adapter output, exist only with an adapter loaded)
    return sorted((b.module, b.into, b.output, b.tokens, gate(b.gate)) for b in spec.branches if not b.optional)


@pytest.mark.parametrize("name", ["wan", "pixart", "sd3", "cogvideox", "flux"])
def test_the_traced_description_finds_the_presets_branches(name):
    model = families.build(name, "smoke")
    report = discover(model)
    preset = presets.get(name).blocks(model)
    for item in report.lists:
        for block_name, spec in item.specs.items():
            expected = {x for x in _branches(preset[block_name])}
            found = set(_branches(spec))
            # The trace also finds the text-stream branches that the presets leave out (nothing reads them on a
            # forecast step): the preset's branches are all found, the rest go into encoder_hidden_states.
            assert expected <= found, (block_name, expected - found)
            assert all(b[1] == "encoder_hidden_states" for b in found - expected), block_name
    costs = report.costs
    assert costs["preset"]["bytes"] < costs["plain modules"]["bytes"]
    assert costs["every block skipped (bound)"]["kernels"] <= costs["preset"]["kernels"]
    assert costs["description"]["kernels"] >= costs["preset"]["kernels"]
    text = format_report(report)
    assert "gated residual branch" in text and "patterns:" in text


def test_wan_marks_and_costs():
    report = discover(families.build("wan", "smoke"))
    (blocks,) = report.lists
    roles = {c.name: c.role for c in blocks.children}
    assert roles == {"norm1": "inner", "attn1": "gated", "attn2": "ungated", "norm2": "inner", "ffn": "gated",
                     "norm3": "inner"}
    assert blocks.patterns == ["blocks.*.attn1", "blocks.*.attn2", "blocks.*.ffn"]
    gates = {c.name: json.loads(c.marks[0].gate) for c in blocks.children if c.role == "gated"}
    assert gates["attn1"] == dict(kind="table", path="scale_shift_table", input="temb", float32=False, index=2,
                                  chunks=6)
    assert gates["ffn"]["index"] == 5
    # the description reads what the preset reads: the same forecast step
    assert report.costs["description"] == report.costs["preset"]


class _Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, h):
        return self.mha(h, h, h, need_weights=False)[0]


class _Block(nn.Module):
    """A DiT block no preset knows: adaLN modulation, self-attention, an ungated cross-attention, an MLP."""

    def __init__(self, dim):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = _Attention(dim)
        self.cross = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens, cond, context):
        scale, gate_attn, shift, gate_mlp = self.modulation(cond).chunk(4, dim=1)
        h = self.norm(tokens) * (1 + scale[:, None]) + shift[:, None]
        tokens = tokens + gate_attn[:, None] * self.attn(h)
        tokens = tokens + self.cross(context.mean(1, keepdim=True).expand_as(tokens))
        return tokens + gate_mlp[:, None] * self.mlp(self.norm(tokens))


class _Model(nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 4)

    def forward(self, x, t, context):
        tokens, cond = self.embed(x), torch.sin(t[:, None] * torch.arange(16.0))
        for layer in self.layers:
            tokens = layer(tokens, cond, context)
        return self.out(tokens)


def _loop(model, steps=12):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 8, 4, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        for s in range(steps):
            x = x - model(x, torch.full((2,), 1.0 - s / steps), context) / steps
    return x


def test_an_unknown_model_is_discovered_described_and_cached():
    torch.manual_seed(0)
    model = _Model().eval()
    inputs = dict(x=torch.randn(2, 8, 4), t=torch.ones(2), context=torch.randn(2, 5, 16))
    # apply() needs no description: it derives one on the first step and verifies it before trusting it
    taylorseer.apply(model, CacheConfig(interval=2, max_order=1, first_enhance=1), num_steps=2)
    with torch.no_grad():
        model(**inputs)
    text = taylorseer.summary(model).describe()
    assert "3 x layers (_Block): derived description (attn, cross, mlp; verified)" in text, text
    taylorseer.remove(model)
    report = discover(model, inputs)
    (layers,) = report.lists
    assert {c.name: c.role for c in layers.children} == {"modulation": "inner", "norm": "inner", "attn": "gated",
                                                         "cross": "ungated", "mlp": "gated"}
    spec = layers.specs["layers.0"]
    assert spec == BlockSpec((Branch("attn", LinearGate("modulation.1", 1, 4, input="cond"), into="tokens"),
                              Branch("cross", None, into="tokens"),
                              Branch("mlp", LinearGate("modulation.1", 3, 4, input="cond"), into="tokens")),
                             returns="tokens")
    reference = _loop(model)
    description = {"layers": spec}
    taylorseer.apply(model, CacheConfig(interval=1), blocks=description)
    assert torch.equal(_loop(model), reference)
    taylorseer.remove(model)
    config = CacheConfig(interval=3, max_order=1, first_enhance=2)
    taylorseer.apply(model, config, modules=layers.patterns, num_steps=12)
    plain = _loop(model)
    taylorseer.remove(model)
    cache = taylorseer.apply(model, config, blocks=description, num_steps=12)
    described = _loop(model)
    assert [r.step for r in cache.history if r.full] == [0, 1, 4, 7, 10]
    taylorseer.remove(model)
    assert (plain - reference).abs().max() > 1e-4
    torch.testing.assert_close(described, plain, rtol=1e-5, atol=1e-5)
    costs = report.costs
    assert costs["description"]["kernels"] < costs["plain modules"]["kernels"]


def test_a_bad_pattern_lists_block_0s_children_and_nested_patterns_are_refused():
    model = families.build("wan", "smoke")
    with pytest.raises(ValueError, match=r"no submodule matches 'blocks\.\*\.mlp'\. Blocks of this model: "
                                         r"blocks \(2 x WanTransformerBlock\): blocks\.0 has norm1, attn1, attn2, "
                                         r"norm2, ffn, norm3"):
        taylorseer.apply(model, CacheConfig(), modules=["blocks.*.mlp"])
    for pattern in ("blocks.*", "*attn*"):
        with pytest.raises(ValueError, match=r"match modules inside other matched modules .*'\*' crosses dots"):
            taylorseer.apply(model, CacheConfig(), modules=[pattern])
    assert taylorseer.get_cache(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_description_errors_name_the_fix():
    model = families.build("wan", "smoke")
    with pytest.raises(ValueError, match=r"blocks\.0: the description caches 'mlp', which WanTransformerBlock does "
                                         r"not have; its children are \['norm1', 'attn1'"):
        taylorseer.apply(model, CacheConfig(), blocks={"blocks": BlockSpec((Branch("mlp"),))})
    with pytest.raises(ValueError, match=r"LinearGate.linear='norm1.linear' does not exist in WanTransformerBlock"):
        taylorseer.apply(model, CacheConfig(), blocks={"blocks": BlockSpec((Branch("ffn", LinearGate("norm1.linear",
                                                                                                      2, 6)),))})
    with pytest.raises(ValueError, match=r"reads \['cond'\], which WanTransformerBlock.forward does not take"):
        taylorseer.apply(model, CacheConfig(), blocks={"blocks": BlockSpec((Branch("ffn", LinearGate(
            "ffn.net.2", 0, 1, input="cond")),))})
    with pytest.raises(ValueError, match=r"blocks=\{'layers': \.\.\.\}: no such module"):
        taylorseer.apply(model, CacheConfig(), blocks={"layers": BlockSpec((Branch("ffn"),))})
    with pytest.raises(ValueError, match="TableGate.index=6 is outside 0..5"):
        taylorseer.apply(model, CacheConfig(), blocks={"blocks": BlockSpec((Branch("ffn", taylorseer.TableGate(
            "scale_shift_table", 6, 6)),))})
    assert taylorseer.get_cache(model) is None


def test_summary_says_what_was_wrapped_and_the_bytes_it_will_hold():
    case = families.bench_case("wan", "smoke")
    config = CacheConfig(interval=3, max_order=2, first_enhance=1)
    cache = taylorseer.apply(case.model, config, num_steps=10)
    summary = taylorseer.summary(case.model)
    assert summary.projected_nbytes() is None and "known after the first full step" in summary.describe()
    with torch.no_grad():
        for i in range(10):  # full steps 0, 3, 6, 9: three factors per feature from step 6 on
            case(timestep=torch.tensor([1000.0 - 100 * i]))
            if i == 0:
                projected = summary.projected_nbytes()
    taylorseer.remove(case.model)
    assert cache.history == []  # remove() dropped the state
    tokens = 2 * 2 * 2  # 2 latent frames x (4 / 2) x (4 / 2)
    feature = tokens * 32 * 4  # (1, tokens, hidden 32) fp32
    # (O+1) x 5 features: the two blocks' 6 branches fold into one run's cross-attention sum and, per gate row, its
    # table-weighted and plain sums (taylorseer.attach.fold)
    assert projected == (2 + 1) * 5 * feature
    assert summary.preset == "wan" and summary.short_blocks == ["blocks.0", "blocks.1"]
    assert summary.keys == ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ffn", "blocks.1.attn1", "blocks.1.attn2",
                            "blocks.1.ffn"]
    text = summary.describe()
    assert text.startswith("WanTransformer3DModel, preset wan: 2 blocks with a forecast-step forward, 6 cached "
                           "features")


def test_cli_on_a_folder_a_class_and_bad_input(tmp_path, capsys):
    model = families.build("pixart", "smoke")
    model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    report = main([str(tmp_path)])
    out = capsys.readouterr().out
    assert report.preset == "pixart" and "transformer_blocks: 2 x BasicTransformerBlock" in out
    assert "ungated residual branch" in out and "every block skipped (bound)" in out
    main([str(tmp_path / "transformer"), "--json"])
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["lists"][0]["children"][1]["role"] == "gated"
    assert load_meta("LTXVideoTransformer3DModel").device.type == "meta"
    with pytest.raises(SystemExit) as exit_info:
        main(["NoSuchTransformer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "neither a folder nor a diffusers class" in err and len(err.splitlines()) == 1


def test_a_preset_family_is_traced_on_meta_unless_its_forward_reads_values(tmp_path, capsys):
    traced = discover(families.build("cogview4", "smoke", device="meta"))  # shapes only: traced and counted
    assert traced.preset == "cogview4" and not traced.note
    assert traced.costs["every block skipped (bound)"]["kernels"] <= traced.costs["preset"]["kernels"]
    # Lumina2 sizes its sequence from the mask's values: listed with the reason, never a crash on the meta device
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "Lumina2Transformer2DModel"}))
    report = main([str(tmp_path)])
    assert report.preset == "lumina2" and report.costs == {} and "reads its inputs' values" in report.note
    assert [(item.path, item.count) for item in report.lists] == [("layers", 26), ("noise_refiner", 2),
                                                                  ("context_refiner", 2)]
    assert "not traced" in capsys.readouterr().out


def test_script_runs_an_unknown_class_static_only():
    # a class autobuild finds no inputs for (its latents are a list of tensors): said, then listed from its shapes
    result = subprocess.run([sys.executable, "-m", "taylorseer.attach.discover", "ZImageTransformer2DModel"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "ZImageTransformer2DModel: no inputs found" in result.stderr and "inputs.pt" in result.stderr
    assert "ZImageTransformer2DModel (no preset)" in result.stdout
    assert "layers: 30 x ZImageTransformerBlock" in result.stdout and "no inputs" in result.stdout


@pytest.mark.parametrize("cls", ["SkyReelsV2Transformer3DModel", "HiDreamImageTransformer2DModel"])  # no preset
def test_script_builds_a_small_instance_traces_and_verifies(cls, capsys):
    report = main([cls])
    out = capsys.readouterr().out
    assert f"{cls} (no preset)" in out and "no inputs" not in out
    assert "verified on the first step:" in out and report.verification
    assert all("uncached" not in line for line in report.verification), report.verification
    patterns = [p for item in report.lists for p in item.patterns]
    assert patterns and not any("norm" in p for p in patterns), patterns  # only modules that carry real work
    derived, bound = report.costs["apply() (derived, verified)"], report.costs["every block skipped (bound)"]
    assert derived["flops"] <= 2 * bound["flops"] + 0.02, report.costs


def test_ops_counter_counts_views_apart():
    x = torch.randn(4, 4)
    ops = count_ops(lambda: (x[:2] + 1).unsqueeze(0))
    assert ops.counts["aten.add.Tensor"] == 1 and ops.kernels == 1 and ops.total == 3
    assert ops.bytes == 2 * 4 * 4 + 2 * 4 * 4  # the add reads 8 floats and writes 8: views move nothing
