"""CLIP score on a tiny transformers CLIPModel saved with save_pretrained and loaded through the same
from_pretrained path as the real one; the numbers equal 100 * max(cos, 0) of embeddings computed by hand."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer_eval import clip_score
from taylorseer_eval.rundir import open_run

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import PROMPTS, random_images, write_image_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    # A character-level BPE vocabulary (sorted, so every process builds the same ids) and no merges.
    symbols = sorted(set(string.ascii_lowercase))
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols]
                                            + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


def test_clip_score_equals_the_embeddings_by_hand(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    colours = np.random.default_rng(1).integers(0, 256, (6, 1, 1, 3), dtype=np.uint8)
    images = (random_images(6, size=40, seed=0, high=60) + colours).astype(np.uint8)
    run = open_run(write_image_run(tmp_path / "run", images))
    result = clip_score.compute_clip_score(run, str(tiny_clip), batch_size=4, device="cpu")

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    by_hand = []
    with torch.no_grad():
        for i, image in enumerate(images):
            inputs = processor(text=[PROMPTS[i % 4]], images=[image], return_tensors="pt", padding=True)
            vision = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
            text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"]).pooler_output)
            cos = (vision.double() @ text.double().T).item() / (vision.double().norm() * text.double().norm()).item()
            by_hand.append(100 * max(cos, 0.0))
    assert [result["per_item"][str(i)] for i in range(6)] == pytest.approx(by_hand, rel=1e-6, abs=1e-9)
    assert result["clip_score"] == pytest.approx(np.mean(by_hand), rel=1e-6, abs=1e-9)
    assert result["num_items"] == 6 and result["model"] == str(tiny_clip)
    assert "100 * max(cos" in result["definition"]


def test_clip_score_needs_every_prompt(tiny_clip, tmp_path):
    folder = write_image_run(tmp_path / "run", random_images(2, size=32))
    data = json.loads((folder / "metrics.json").read_text())
    del data["items"][1]["prompt"]
    (folder / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="have no prompt"):
        clip_score.compute_clip_score(open_run(folder), str(tiny_clip), device="cpu")


def test_local_clip_folder_must_hold_a_model(tmp_path):
    # the hub path (no network) is exercised through the command in test_eval_cli.py
    with pytest.raises(WeightsNotFoundError, match="no CLIP model at"):
        clip_score.load_clip(str(tmp_path / "missing"), torch.device("cpu"))
