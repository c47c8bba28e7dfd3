"""CLIP score against torchmetrics' ``clip_score`` itself (what Diffusion-4K's script calls), long prompts included:
its truncation of the token ids to the text context and the pooled position that follows from it."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
from ultraflux_eval.backbones.clip import ClipBundle, tiny_clip
from ultraflux_eval.config import BenchmarkConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.alignment import clip_score
from ultraflux_eval.protocol.evaluate import evaluate

SHORT = "a red fox in snow"
# 140 characters: the tiny CLIP's tokenizer is character-level, so this is far beyond the 77-token context
LONG = "a lighthouse on a cliff above a stormy sea at dusk, waves breaking on black rocks, " + "x" * 57


class _TensorFeatures(torch.nn.Module):
    """The CLIP model as torchmetrics calls it: transformers 5's ``get_*_features`` return a model output whose
    ``pooler_output`` is the projected feature; torchmetrics (written against transformers 4) expects the tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _openai_like(bundle: ClipBundle) -> ClipBundle:
    """The same weights with OpenAI's id conventions: ``<|endoftext|>`` is the highest token id and the text config
    says ``eos_token_id = 2`` (as OpenAI's CLIP configs do), so the text tower pools at the highest id in the
    sequence (the end-of-text token when it is there) instead of at the first end-of-text id."""
    from transformers import CLIPModel, CLIPTokenizer

    vocab = bundle.tokenizer.get_vocab()
    order = [t for t in sorted(vocab, key=vocab.get) if t != "<|endoftext|>"] + ["<|endoftext|>"]
    new_ids = {token: i for i, token in enumerate(order)}
    config = bundle.model.config
    config.text_config.eos_token_id = 2
    config.text_config.pad_token_id = new_ids["<|endoftext|>"]
    model = CLIPModel(config).eval()
    state = bundle.model.state_dict()
    embedding = "text_model.embeddings.token_embedding.weight"
    permutation = torch.tensor([vocab[token] for token in order])
    state[embedding] = state[embedding][permutation]  # token t keeps its embedding under its new id
    model.load_state_dict(state)
    return ClipBundle(model, CLIPTokenizer(vocab=new_ids, merges=[]), bundle.processor, bundle.max_length)


def _theirs(bundle: ClipBundle, image: np.ndarray, prompt: str) -> float:
    """torchmetrics' clip_score of one pair, as Diffusion-4K calls it (uint8 ``[1, 3, H, W]``, one prompt)."""
    from transformers import CLIPProcessor

    processor = CLIPProcessor(image_processor=bundle.processor, tokenizer=bundle.tokenizer)
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    too_long = len(bundle.tokenizer(prompt)["input_ids"]) > bundle.max_length
    with pytest.warns(UserWarning, match="longer than") if too_long else contextlib.nullcontext():
        score = torchmetrics_clip_score(
            pixels, [prompt], model_name_or_path=lambda: (_TensorFeatures(bundle.model), processor)
        )
    return float(score.detach())


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), np.full((64, 40, 3), (200, 40, 40), np.uint8)]


@pytest.mark.parametrize("openai_ids", [False, True], ids=["first-eos-pooling", "highest-id-pooling"])
def test_clip_score_equals_torchmetrics_on_long_and_short_prompts(pictures, openai_ids):
    bundle = tiny_clip(seed=0)
    bundle = _openai_like(bundle) if openai_ids else bundle
    assert len(bundle.tokenizer(LONG)["input_ids"]) > 77
    prompts = [LONG, SHORT]
    ours = clip_score(bundle, pictures, prompts, batch_size=2)  # one batch: the short prompt is padded to 77
    theirs = [_theirs(bundle, image, prompt) for image, prompt in zip(pictures, prompts, strict=True)]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert ours[0] > 0
    # the tokenizer's truncation keeps the end-of-text token: another embedding, another score, for the long prompt
    kept = clip_score(bundle, pictures, prompts, batch_size=2, truncation="tokenizer")
    assert kept[0] != pytest.approx(theirs[0], abs=1e-2)
    assert kept[1] == pytest.approx(theirs[1], abs=1e-4)


def test_evaluate_follows_the_clip_truncation_setting(pictures):
    prompts = [LONG, SHORT]
    default = BenchmarkConfig(metrics=("clip_score",))
    assert default.clip_truncation == "torchmetrics"
    ours = evaluate(pictures, prompts, default)
    other = evaluate(pictures, prompts, default.model_copy(update={"clip_truncation": "tokenizer"}))
    bundle = tiny_clip(seed=0)  # what evaluate's tiny backbones hold
    assert ours.rows[0]["clip_score"] == pytest.approx(_theirs(bundle, pictures[0], LONG), abs=1e-4)
    assert other.rows[0]["clip_score"] != pytest.approx(ours.rows[0]["clip_score"], abs=1e-2)
    with pytest.raises(EvalError, match="truncation must be one of"):
        clip_score(bundle, pictures, prompts, truncation="middle")
