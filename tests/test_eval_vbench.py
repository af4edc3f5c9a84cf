"""VBench's total score as VBench defines it, and VBench's prompt list as a prompt file for sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taylorseer.harness.diffusers_io import read_prompts
from taylorseer_eval import vbench_eval as vb

ROOT = Path(__file__).resolve().parents[1]


def test_the_16_dimensions_split_into_7_quality_and_9_semantic():
    assert len(vb.DIMENSIONS) == len(set(vb.DIMENSIONS)) == 16
    assert len(vb.QUALITY) == 7 and len(vb.SEMANTIC) == 9
    assert sum(vb.DIM_WEIGHT[d] for d in vb.QUALITY) == 6.5 and vb.DIM_WEIGHT["dynamic_degree"] == 0.5


def test_total_score_at_the_normalisation_bounds_is_0_and_1():
    low = vb.total_score({d: lo for d, (lo, _hi) in vb.NORMALIZE.items()})
    high = vb.total_score({d: hi for d, (_lo, hi) in vb.NORMALIZE.items()})
    assert (low["total_score"], low["quality_score"], low["semantic_score"]) == (0, 0, 0)
    assert high["total_score"] == pytest.approx(1) and high["semantic_score"] == pytest.approx(1)


def test_total_score_written_out_for_one_set_of_scores():
    scores = {d: 0.5 for d in vb.DIMENSIONS}
    scores.update(subject_consistency=0.95, motion_smoothness=0.99, dynamic_degree=0.6, scene=0.4,
                  appearance_style=0.2, temporal_style=0.25, overall_consistency=0.27, temporal_flickering=0.98)
    quality = ((0.95 - 0.1462) / (1 - 0.1462) + (0.5 - 0.2615) / (1 - 0.2615) + (0.98 - 0.6293) / (1 - 0.6293)
               + (0.99 - 0.706) / (0.9975 - 0.706) + 0.5 + 0.5 + 0.5 * 0.6) / 6.5
    semantic = (0.5 * 5 + 0.4 / 0.8222 + (0.2 - 0.0009) / (0.2855 - 0.0009) + 0.25 / 0.364 + 0.27 / 0.364) / 9
    out = vb.total_score(scores)
    assert out["quality_score"] == pytest.approx(quality, rel=1e-12)
    assert out["semantic_score"] == pytest.approx(semantic, rel=1e-12)
    assert out["total_score"] == pytest.approx((4 * quality + semantic) / 5, rel=1e-12)
    with pytest.raises(ValueError, match="needs all 16 dimensions"):
        vb.total_score({"color": 0.5})


def test_prompt_file_from_a_full_info_list_keeps_order_and_drops_repeats(tmp_path):
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "b dog", "dimension": ["scene"]},
                                {"prompt_en": "a cat", "dimension": ["color"]},
                                {"prompt_en": "b dog", "dimension": ["color"]}]))
    out = vb.write_prompt_file(tmp_path / "prompts.txt", str(info))
    assert out["prompts"] == 2
    assert read_prompts(prompt_file=str(tmp_path / "prompts.txt")) == ["b dog", "a cat"]
    assert vb.expected_videos(info, "color") == 10
    with pytest.raises(FileNotFoundError, match="--full-info"):
        vb.write_prompt_file(tmp_path / "x.txt", str(tmp_path / "missing.json"))


@pytest.mark.skipif(not list((ROOT / ".venv-vbench").glob("lib/python*/site-packages/vbench/VBench_full_info.json")),
                    reason="needs `bash scripts/setup_eval_envs.sh vbench` (the list ships in the vbench wheel)")
def test_vbench_prompt_list_from_the_installed_wheel(tmp_path):
    out = vb.write_prompt_file(tmp_path / "vbench_prompts.txt")
    prompts = read_prompts(prompt_file=str(tmp_path / "vbench_prompts.txt"))
    # 946 entries, 944 distinct prompts (two serve two dimensions each): 4,720 videos at 5 per prompt
    assert out["prompts"] == len(prompts) == 944
    assert len(json.loads(Path(out["source"]).read_text())) == 946
