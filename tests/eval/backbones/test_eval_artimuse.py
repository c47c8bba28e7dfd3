"""ArtiMuse over transformers' InternVL: a tiny checkpoint in the ORIGINAL InternVLChatModel layout (config.json of
type internvl_chat, fused-qkv InternViT keys, safetensors shards + index, tokenizer files) is loaded through
``load_artimuse`` and checked against the network recomputed by hand from the original tensors, following
InternViT's and InternVLChatModel's definitions (not transformers' code)."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM
from ultraflux_eval.backbones.artimuse import (
    ArtiMuseScorer,
    chat_query,
    convert_checkpoint,
    convert_config,
    load_artimuse,
    score_token,
    tiny_artimuse,
    tiny_original_config,
    tiny_tokenizer,
)
from ultraflux_eval.errors import EvalError

LETTERS = string.ascii_lowercase
# the 101 answer tokens of aes_tokens.py, spelled out: 0-25 a?, 26-50 c?, 51-75 d?, 76-100 e?
ANSWERS = [f"a{x}" for x in LETTERS] + [f"{band}{x}" for band in "cde" for x in LETTERS[:25]]
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def original_state(original: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under InternVLChatModel's key names and shapes: InternViT (fused qkv, ls1/ls2, norm1/2),
    mlp1 = LayerNorm → Linear → GELU → Linear, and transformers' Qwen2ForCausalLM as ``language_model``."""
    gen = torch.Generator().manual_seed(seed)
    vision, llm = original["vision_config"], original["llm_config"]
    c, inner, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    hidden, positions = llm["hidden_size"], (vision["image_size"] // p) ** 2 + 1

    def rand(*shape: int, mean: float = 0.0, std: float = 0.3) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=gen)

    state = {"vision_model.embeddings.class_embedding": rand(1, 1, c),
             "vision_model.embeddings.patch_embedding.weight": rand(c, 3, p, p, std=0.05),
             "vision_model.embeddings.patch_embedding.bias": rand(c),
             "vision_model.embeddings.position_embedding": rand(1, positions, c)}
    for i in range(vision["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        state.update({pre + "attn.qkv.weight": rand(3 * c, c), pre + "attn.proj.weight": rand(c, c),
                      pre + "attn.proj.bias": rand(c), pre + "ls1": rand(c, mean=0.5), pre + "ls2": rand(c, mean=-0.5),
                      pre + "norm1.weight": rand(c, mean=1.0), pre + "norm2.weight": rand(c, mean=1.0),
                      pre + "mlp.fc1.weight": rand(inner, c), pre + "mlp.fc1.bias": rand(inner),
                      pre + "mlp.fc2.weight": rand(c, inner), pre + "mlp.fc2.bias": rand(c)})
        if vision["qkv_bias"]:
            state[pre + "attn.qkv.bias"] = rand(3 * c)
        if vision["norm_type"] == "layer_norm":  # InternRMSNorm has no bias
            state.update({pre + "norm1.bias": rand(c), pre + "norm2.bias": rand(c)})
        if vision["qk_normalization"]:
            state.update({pre + "attn.q_norm.weight": rand(c, mean=1.0), pre + "attn.k_norm.weight": rand(c, mean=1.0)})
    state.update({"mlp1.0.weight": rand(4 * c, mean=1.0), "mlp1.0.bias": rand(4 * c),
                  "mlp1.1.weight": rand(hidden, 4 * c), "mlp1.1.bias": rand(hidden),
                  "mlp1.3.weight": rand(hidden, hidden), "mlp1.3.bias": rand(hidden)})
    lm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in llm.items() if k not in ("architectures", "model_type")},
                                      tie_word_embeddings=False))
    state.update({"language_model." + key: rand(*value.shape, mean=1.0 if "norm" in key else 0.0, std=0.2)
                  for key, value in lm.state_dict().items()})
    return state


def write_tokenizer(folder: Path) -> None:
    """Qwen2 tokenizer files as InternVL releases them: vocab.json + merges.txt + tokenizer_config.json whose
    added_tokens_decoder holds the chat and image tokens (no tokenizer.json)."""
    vocab = tiny_tokenizer().get_vocab()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    (folder / "vocab.json").write_text(json.dumps({k: i for k, i in vocab.items() if k not in specials}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    added = {str(vocab[token]): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True} for token in specials}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "additional_special_tokens": specials[1:],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "model_max_length": 8192, "split_special_tokens": False}))


def write_checkpoint(folder: Path, original: dict, state: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """The released layout: config.json, tokenizer files, model-0000i-of-0000n.safetensors + index (or one
    model.safetensors without index when ``shards`` is 1)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original))
    write_tokenizer(folder)
    if shards == 1:
        save_file({k: t.contiguous() for k, t in state.items()}, folder / "model.safetensors")
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    original = tiny_original_config(len(tiny_tokenizer()))
    state = original_state(original)
    return write_checkpoint(tmp_path_factory.mktemp("artimuse") / "ArtiMuse", original, state), original, state


@pytest.fixture(scope="module")
def scorer(released) -> ArtiMuseScorer:
    return load_artimuse(released[0], batch_size=2)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
            np.clip(rng.normal(90, 30, (56, 40, 3)), 0, 255).astype(np.uint8), np.full((30, 50, 3), 230, np.uint8)]


# ---- the oracle: InternVLChatModel recomputed by hand from the original tensors ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hand_vit(state: dict, vision: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternVisionModel's last hidden state ``[B, 1 + N, C]``: pre-norm blocks with layer scale, no final norm;
    q/k RMS-normalised over all heads together when ``qk_normalization``."""
    p, heads, eps = vision["patch_size"], vision["num_attention_heads"], vision["layer_norm_eps"]
    v = "vision_model."
    patches = F.conv2d(pixels, state[v + "embeddings.patch_embedding.weight"],
                       state[v + "embeddings.patch_embedding.bias"], stride=p).flatten(2).transpose(1, 2)
    cls = state[v + "embeddings.class_embedding"].expand(len(pixels), 1, -1)
    position = state[v + "embeddings.position_embedding"]  # [1, 1 + g², C] for the config's image_size
    g, side = math.isqrt(position.shape[1] - 1), math.isqrt(patches.shape[1])
    grid = position[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # resampled as InternVisionEmbeddings does
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    position = torch.cat([position[:, :1], grid.reshape(1, -1, side * side).permute(0, 2, 1)], 1)
    x = torch.cat([cls, patches], 1) + position
    batch, tokens, c = x.shape
    d = c // heads
    for i in range(vision["num_hidden_layers"]):
        w = {k.removeprefix(f"{v}encoder.layers.{i}."): t for k, t in state.items()
             if k.startswith(f"{v}encoder.layers.{i}.")}
        def norm(t: torch.Tensor, name: str) -> torch.Tensor:
            if vision["norm_type"] == "rms_norm":
                return rms_norm(t, w[name + ".weight"], eps)
            return F.layer_norm(t, (c,), w[name + ".weight"], w[name + ".bias"], eps)

        h = norm(x, "norm1")
        qkv = (h @ w["attn.qkv.weight"].T + w.get("attn.qkv.bias", 0)).view(batch, tokens, 3, heads, d)
        q, k, val = qkv.unbind(2)  # [B, T, heads, d]
        if vision["qk_normalization"]:
            q = rms_norm(q.flatten(2), w["attn.q_norm.weight"], eps).view(q.shape)
            k = rms_norm(k.flatten(2), w["attn.k_norm.weight"], eps).view(k.shape)
        q, k, val = q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2)  # [B, heads, T, d]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ val
        attn = attn.transpose(1, 2).reshape(batch, tokens, c) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        x = x + w["ls1"] * attn
        h = norm(x, "norm2")
        mlp = F.gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        x = x + w["ls2"] * mlp
    return x


def hand_shuffle(grid: torch.Tensor) -> torch.Tensor:
    """ps_version v2 at ratio 0.5, by its meaning: ``[B, G, G, C]`` → ``[B, (G/2)², 4C]``, token (i, j) is the 2×2
    block at rows 2i..2i+1, columns 2j..2j+1, read row by row (top-left, top-right, bottom-left, bottom-right)."""
    half = grid.shape[1] // 2
    return torch.stack([torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                                   grid[:, 2 * i + 1, 2 * j + 1]], -1)
                        for i in range(half) for j in range(half)], 1)


def hand_features(state: dict, vision: dict, pixels: torch.Tensor) -> torch.Tensor:
    """``extract_feature``: drop CLS, pixel shuffle, mlp1 → ``[B, image tokens, hidden]``."""
    patches = hand_vit(state, vision, pixels)[:, 1:]
    side = math.isqrt(patches.shape[1])
    merged = hand_shuffle(patches.reshape(len(pixels), side, side, -1))
    h = F.layer_norm(merged, (merged.shape[-1],), state["mlp1.0.weight"], state["mlp1.0.bias"])
    return F.gelu(h @ state["mlp1.1.weight"].T + state["mlp1.1.bias"]) @ state["mlp1.3.weight"].T + state["mlp1.3.bias"]


def expected_prompt(image_tokens: int) -> str:
    """What the internvl2_5 template renders for ``'<image>\\n' + question`` (conversation.py, MPT style)."""
    question = ("\n        Rate the aesthetics score of the image in 0-100. \n"
                "        In the output format, numbers are replaced by 2 corresponding letters, \n"
                "        and the mapping relationship is: \n"
                "        score 0 to 25: 0-aa, 1-ab, 2-ac, 3-ad, ... , 25-az,\n"
                "        score 26 to 50: 26-ca, 27-cb, 28-cc, 29-cd, ..., 50-cy,\n"
                "        score 51 to 75: 51-da, 52-db, 53-dc, 54-dd, ..., 75-dy,\n"
                "        score 76 to 100: 76-ea, 77-eb, 78-ec, 79-ed, ..., 100-ey.\n\n"
                "        The answer only outputs 2 corresponding letters.\n        ")
    image = "<img>" + "<IMG_CONTEXT>" * image_tokens + "</img>"
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{image}\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_vision_tower_and_projector_equal_internvit_by_hand(released, scorer, pictures):
    _, original, state = released
    pixels = scorer.pixel_values(pictures)
    with torch.no_grad():
        tower = scorer.model.model.vision_tower(pixel_values=pixels).last_hidden_state
        features = scorer.model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(tower, hand_vit(state, original["vision_config"], pixels), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, hand_features(state, original["vision_config"], pixels), rtol=1e-4,
                               atol=1e-4)


def test_internvit_6b_style_blocks_map_too(tmp_path, released, pictures):
    """RMSNorm blocks with q/k normalisation and no qkv bias (InternViT-6B's variant) map and compute the same;
    position embeddings trained at 42 px are resampled to the 56-px ``force_image_size``."""
    original = json.loads(json.dumps(released[1]))
    original["vision_config"].update(norm_type="rms_norm", qk_normalization=True, qkv_bias=False, image_size=42)
    state = original_state(original, seed=3)
    scorer = load_artimuse(write_checkpoint(tmp_path / "ArtiMuse", original, state, shards=1))
    pixels = scorer.pixel_values(pictures)
    with torch.no_grad():
        tower = scorer.model.model.vision_tower(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tower, hand_vit(state, original["vision_config"], pixels), rtol=1e-4, atol=1e-4)


def test_pixel_shuffle_is_ps_v2_on_labelled_grid(scorer):
    grid = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    ours = scorer.model.model.pixel_shuffle(grid, scale_factor=0.5).reshape(2, 4, 12)
    torch.testing.assert_close(ours, hand_shuffle(grid), rtol=0, atol=0)


def test_prompt_and_score_equal_the_original_score_path(released, scorer, pictures):
    folder, original, state = released
    tokenizer = scorer.tokenizer
    ids = tokenizer(expected_prompt(4), return_tensors="pt")["input_ids"]
    assert torch.equal(scorer.input_ids, ids)
    # generate_logits: embed the prompt, put the image features at <IMG_CONTEXT>, run the original LM
    llm = original["llm_config"]
    lm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in llm.items() if k not in ("architectures", "model_type")},
                                      tie_word_embeddings=False))
    lm.load_state_dict({k.removeprefix("language_model."): t for k, t in state.items()
                        if k.startswith("language_model.")}, strict=True)
    pixels = scorer.pixel_values(pictures)
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids).repeat(len(pictures), 1, 1)
        embeds[ids.expand(len(pictures), -1) == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")] = (
            hand_features(state, original["vision_config"], pixels).reshape(-1, embeds.shape[-1]))
        logits = lm(inputs_embeds=embeds).logits[:, -1]
    answer_ids = tokenizer.convert_tokens_to_ids(ANSWERS)
    oracle = (torch.softmax(logits[:, answer_ids].double(), -1) @ torch.arange(101, dtype=torch.float64)).numpy()
    torch.testing.assert_close(scorer.last_logits(pixels), logits, rtol=1e-4, atol=1e-4)
    scores = scorer.score(pictures)  # batch_size 2: a full and a partial batch
    assert scores.dtype == np.float64 and scores.shape == (3,)
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-4)
    assert np.all((scores >= 0) & (scores <= 100)) and np.ptp(scores) > 1e-3


def test_pixel_values_follow_eval_image_transform(scorer, pictures):
    from PIL import Image

    tile = np.asarray(Image.fromarray(pictures[0]).resize((56, 56), Image.Resampling.BICUBIC), np.float64) / 255
    want = (tile - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    got = scorer.pixel_values(pictures[:1])[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_convert_checkpoint_splits_qkv_in_q_k_v_order():
    fused = torch.arange(12.0).reshape(6, 2)
    out = convert_checkpoint({"vision_model.encoder.layers.3.attn.qkv.weight": fused})
    pre = "model.vision_tower.encoder.layer.3.attention."
    assert [out[pre + f"{n}_proj.weight"].tolist() for n in "qkv"] == [fused[0:2].tolist(), fused[2:4].tolist(),
                                                                       fused[4:6].tolist()]


def test_score_tokens_follow_aes_tokens():
    assert [score_token(n) for n in range(101)] == ANSWERS
    with pytest.raises(EvalError, match="0..100"):
        score_token(101)


def test_tiny_artimuse_scores_vary_and_batches_agree(pictures):
    tiny = tiny_artimuse(seed=1)
    one = tiny.score(pictures)
    tiny.batch_size = 3
    np.testing.assert_allclose(tiny.score(pictures), one, atol=1e-4)
    assert np.all((one >= 0) & (one <= 100)) and np.ptp(one) > 0.01
    assert tiny.score([]).shape == (0,)


def _variant(tmp_path: Path, released, edit) -> Path:
    _, original, state = released
    state = dict(state)
    edit(state)
    return write_checkpoint(tmp_path / "variant", original, state)


def test_strict_loading_names_the_offending_key(tmp_path, released):
    extra = _variant(tmp_path / "a", released,
                     lambda s: s.__setitem__("vision_model.encoder.layers.0.attn.rope", torch.zeros(1)))
    with pytest.raises(EvalError, match=r"unexpected key 'vision_model\.encoder\.layers\.0\.attn\.rope'"):
        load_artimuse(extra)
    beyond = _variant(tmp_path / "b", released,
                      lambda s: s.__setitem__("vision_model.encoder.layers.7.ls1", torch.zeros(16)))
    with pytest.raises(EvalError, match=r"unexpected \['model\.vision_tower\.encoder\.layer\.7\.lambda_1'\]"):
        load_artimuse(beyond)
    missing = _variant(tmp_path / "c", released, lambda s: s.pop("mlp1.1.bias"))
    with pytest.raises(EvalError, match=r"missing \['model\.multi_modal_projector\.linear_1\.bias'\]"):
        load_artimuse(missing)
    wrong = _variant(tmp_path / "d", released, lambda s: s.__setitem__("mlp1.3.bias", torch.zeros(5)))
    with pytest.raises(EvalError, match="size mismatch"):
        load_artimuse(wrong)
    plain = _variant(tmp_path / "e", released, lambda s: None)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                      if t["content"] != "<IMG_CONTEXT>"}
    config["additional_special_tokens"].remove("<IMG_CONTEXT>")
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EvalError, match=r"lacks InternVL's image tokens \['<IMG_CONTEXT>'\]"):
        load_artimuse(plain)


def test_pickles_and_missing_files_are_refused(tmp_path, released):
    with pytest.raises(EvalError, match="weights fetch --only artimuse"):
        load_artimuse(tmp_path / "nowhere")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(released[1]))
    torch.save({"mlp1.1.bias": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(EvalError, match=r"only pickled weights \['pytorch_model\.bin'\].*safetensors only"):
        load_artimuse(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    with pytest.raises(EvalError, match="non-safetensors"):
        load_artimuse(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    write_tokenizer(folder)
    with pytest.raises(EvalError, match="not a readable safetensors file"):
        load_artimuse(folder)


def test_llama_language_model_converts_untied():
    original = tiny_original_config(400)
    original["llm_config"].update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True)
    config = convert_config(original, image_token_id=7)
    assert (config.text_config.model_type, config.tie_word_embeddings, config.image_token_id) == ("llama", False, 7)
    assert (config.image_seq_length, config.vision_config.image_size) == (4, (56, 56))


@pytest.mark.parametrize(("change", "message"), [
    ({"ps_version": "v1"}, "ps_version 'v1'"),
    ({"select_layer": -2}, "select_layer -2"),
    ({"llm_config": {"architectures": ["InternLM2ForCausalLM"]}}, "InternLM2ForCausalLM"),
    ({"downsample_ratio": 0.3}, "downsample_ratio"),
    ({"template": "phi3-chat"}, "template 'phi3-chat'"),
    ({"use_llm_lora": 128}, "LoRA"),
    ({"llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": "big"}}, "valid InternVL model"),
])
def test_unsupported_configs_are_refused(change, message):
    original = {**tiny_original_config(400), **change}
    with pytest.raises(EvalError, match=message):
        convert_config(original)
        chat_query(original)
