"""Q-Align on its released architecture (pyiqa's mPLUG-Owl2) at toy width: the readout, the prompt, the released
folder layout (sharded safetensors or pickled .bin), strict loading, fetching from a stand-in hub, and that
transformers' own Llama is left untouched in the process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from ultraflux_eval.backbones.loading import local_backbones
from ultraflux_eval.backbones.qalign import (
    IMAGE_TOKEN,
    LEVELS,
    PROMPT,
    QAlignScorer,
    expand_to_square,
    load_qalign,
    qalign_readout,
    tiny_qalign,
)
from ultraflux_eval.backbones.weights import LocalHub, fetch_weights
from ultraflux_eval.errors import EvalError


@pytest.fixture(scope="module")
def tiny() -> QAlignScorer:
    return tiny_qalign(seed=3)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), np.full((30, 30, 3), (250, 10, 10), np.uint8),
            np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[:, None, None], (1, 20, 3))]


def test_readout_is_the_expected_level():
    logits = torch.tensor([[50.0, 0, 0, 0, 0], [0, 0, 0, 0, 50.0], [0.0, 0, 0, 0, 0], [0, 50.0, 50.0, 0, 0]])
    torch.testing.assert_close(qalign_readout(logits), torch.tensor([5.0, 1.0, 3.0, 3.5]))


def test_padding_to_a_square_centres_the_image_on_the_mean_colour():
    rgb = np.full((2, 4, 3), 9, np.uint8)
    square = np.asarray(expand_to_square(rgb, (0.5, 0.25, 0.0)))
    assert square.shape == (4, 4, 3)
    assert (square[1:3] == 9).all() and (square[0] == (127, 63, 0)).all() and (square[3] == (127, 63, 0)).all()


def test_score_is_the_level_expectation_at_the_prompt_end(tiny, pictures):
    """The score reads the logits of exactly the five level words at the last prompt position."""
    ids = tiny.prompt_ids.tolist()
    assert ids.count(-200) == 1 and ids[0] == tiny.tokenizer.bos_token_id  # one image slot, BOS first
    text = PROMPT.format(task="quality")
    assert tiny.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True).split() == \
        text.replace(IMAGE_TOKEN, " ").split()
    assert tiny.level_ids == [tiny.tokenizer.convert_tokens_to_ids(w) for w in LEVELS]
    pixels = tiny.processor(images=[expand_to_square(pictures[0], tiny.processor.image_mean)],
                            return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = tiny.network(input_ids=tiny.prompt_ids[None], images=pixels)["logits"][0, -1]
    expected = (logits[tiny.level_ids].softmax(-1) * torch.tensor([5.0, 4, 3, 2, 1])).sum()
    scores = tiny.score(pictures)
    assert scores[0] == pytest.approx(float(expected), abs=1e-5)
    assert ((scores >= 1) & (scores <= 5)).all() and len(set(np.round(scores, 6))) == 3  # varies with the image
    np.testing.assert_allclose(tiny_qalign(seed=3).score(pictures[:1]), scores[:1], atol=1e-6)  # seeded


def test_transformers_llama_is_left_as_it_was(tiny):
    """pyiqa's import-time rebinding of transformers' Llama is undone: plain Llama models keep their own code."""
    import transformers.models.llama.modeling_llama as llama

    assert llama.LlamaDecoderLayer.__module__ == llama.__name__
    assert llama.LlamaModel.forward.__module__ == llama.__name__
    assert not hasattr(llama, "LlamaSdpaAttention")  # transformers 5 has none; pyiqa's import had added one
    layer = tiny.network.model.layers[0]
    assert type(layer).__module__.startswith("pyiqa.") and hasattr(layer.input_layernorm, "multiway")


def _released_folder(scorer: QAlignScorer, folder, fmt: str) -> None:
    """``scorer`` saved the way q-future/one-align is published: config, tokenizer, preprocessor, shards."""
    scorer.network.config.save_pretrained(folder)
    scorer.tokenizer.save_pretrained(folder)
    scorer.processor.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in scorer.network.state_dict().items()}
    keys = sorted(state)
    halves = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2 :]}
    if fmt == "bin":  # a single pickled checkpoint
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for tag, part in halves.items():
        name = f"model-0000{1 if tag == 'a' else 2}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_released_layout_loads_strictly_and_scores_the_same(tmp_path, tiny, pictures, fmt):
    _released_folder(tiny, tmp_path, fmt)
    loaded = load_qalign(tmp_path)
    np.testing.assert_allclose(loaded.score(pictures), tiny.score(pictures), atol=1e-5)


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, tiny):
    _released_folder(tiny, tmp_path, "safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    save_file({"model.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    index["weight_map"]["model.extra.weight"] = "extra.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EvalError, match=r"(?s)does not fit mPLUG-Owl2.*model\.extra\.weight"):
        load_qalign(tmp_path)
    (tmp_path / "extra.safetensors").unlink()
    with pytest.raises(EvalError, match="extra.safetensors is missing"):
        load_qalign(tmp_path)
    with pytest.raises(EvalError, match="no Q-Align weights folder .*weights fetch --only qalign"):
        load_qalign(tmp_path / "nowhere")
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        (tmp_path / name).unlink()
    with pytest.raises(EvalError, match="has no Q-Align checkpoint"):
        load_qalign(tmp_path)


def test_fetch_from_a_stand_in_hub_then_score_through_the_manifest(tmp_path, tiny, pictures):
    """`weights fetch --only qalign` reads the index, takes every shard it names and the tokenizer files the repo
    has, and the evaluation loads the result through the sha256 manifest."""
    repo = tmp_path / "hub" / "hf" / "q-future" / "one-align" / "main"
    repo.mkdir(parents=True)
    _released_folder(tiny, repo, "safetensors")
    with pytest.raises(EvalError, match="no pinned commit"):
        fetch_weights(tmp_path / "w", ["qalign"], hub=LocalHub(tmp_path / "hub"))
    fetch_weights(tmp_path / "w", ["qalign"], hub=LocalHub(tmp_path / "hub"), allow_unpinned=True)
    manifest = yaml.safe_load((tmp_path / "w" / "manifest.yaml").read_text())
    assert manifest["backbones"] == {"qalign": "qalign"}
    assert {"qalign/model-00001-of-00002.safetensors", "qalign/model-00002-of-00002.safetensors",
            "qalign/model.safetensors.index.json", "qalign/tokenizer.json"} <= set(manifest["files"])
    assert "qalign/tokenizer.model" not in manifest["files"]  # optional, absent from this repo
    nets = local_backbones(tmp_path / "w", ["qalign"])
    np.testing.assert_allclose(nets.qalign.score(pictures), tiny.score(pictures), atol=1e-5)
