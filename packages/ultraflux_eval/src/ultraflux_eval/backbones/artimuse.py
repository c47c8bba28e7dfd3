"""ArtiMuse (Cao et al., 2025, "ArtiMuse: Fine-Grained Image Aesthetics Assessment with Joint Scoring and
Expert-Level Understanding", arXiv 2507.14533), loaded over transformers' own InternVL classes.

ArtiMuse is InternVL3-8B (InternViT-300M vision tower, pixel-shuffle + MLP projector, Qwen2.5-7B language model)
fine-tuned to answer an aesthetics question with one of 101 two-letter tokens: score ``n`` in 0-25 is ``a`` +
the n-th letter (``aa`` … ``az``), 26-50 ``c…``, 51-75 ``d…``, 76-100 ``e…`` (``ca`` … ``ey``). The score is the
expected value of ``n`` under the softmax of the next-token logits restricted to those 101 tokens
(``InternVLChatModel.score`` in the released ``modeling_artimuse.py``), so it lies in [0, 100].

The release (``Thunderbolt215215/ArtiMuse``) ships remote code (``InternVLChatModel``, config type
``internvl_chat``), not a pip package. This module reproduces its scoring path instead of running that code:

- preprocessing (``src/eval/eval_image.py``): RGB, one 448×448 bicubic tile (no dynamic tiling), ImageNet
  mean/std;
- the prompt: the conversation template named in ``config.json`` (``internvl2_5``: chatml with InternVL's
  system message), the score question with its exact whitespace, ``<img>`` + ``<IMG_CONTEXT>`` × image tokens +
  ``</img>``;
- the network: the original key layout (``vision_model.*`` with fused ``attn.qkv``, ``mlp1.{0,1,3}``,
  ``language_model.{model,lm_head}.*``) mapped onto ``InternVLForConditionalGeneration``, and the original config
  (``vision_config``, ``llm_config``, ``downsample_ratio``, ``ps_version``, ``select_layer``, ``template``) mapped
  onto ``InternVLConfig``. transformers' feature path equals the original's for what we accept (pixel shuffle
  ``ps_version`` v2, last layer, CLS token dropped, no final vision norm); anything else is refused.

Two deliberate differences: upstream takes the expectation in the model dtype (bf16 on GPU, which rounds a
score in [64, 100] to a multiple of 0.5), we take it in float64 from the same logits; image files get their EXIF
orientation applied (``scores.load_rgb``, as for every scorer here), upstream's ``Image.open`` does not.

Checked only on tiny random models of the same architecture (tests/eval/backbones/test_eval_artimuse.py builds a
checkpoint folder in the original layout and recomputes the network by hand from its tensors); the 8B release was not
reachable here, so agreement with the paper's numbers is not verified.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ultraflux_eval.backbones.checkpoints import SAFETENSORS_LAYOUT, checkpoint_files
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import ImageLike, load_rgb

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FETCH_HINT = "run `ultraflux-eval weights fetch --only artimuse`"

# The score question of ``InternVLChatModel.score``: the model was fine-tuned on this text, indentation and
# trailing spaces included, so it is rebuilt line by line (an editor cannot strip the trailing spaces).
_INDENT = " " * 8
QUESTION = "\n".join([
    "",
    _INDENT + "Rate the aesthetics score of the image in 0-100. ",
    _INDENT + "In the output format, numbers are replaced by 2 corresponding letters, ",
    _INDENT + "and the mapping relationship is: ",
    _INDENT + "score 0 to 25: 0-aa, 1-ab, 2-ac, 3-ad, ... , 25-az,",
    _INDENT + "score 26 to 50: 26-ca, 27-cb, 28-cc, 29-cd, ..., 50-cy,",
    _INDENT + "score 51 to 75: 51-da, 52-db, 53-dc, 54-dd, ..., 75-dy,",
    _INDENT + "score 76 to 100: 76-ea, 77-eb, 78-ec, 79-ed, ..., 100-ey.",
    "",
    _INDENT + "The answer only outputs 2 corresponding letters.",
    _INDENT,
])
_SCORE_BANDS = ((76, "e"), (51, "d"), (26, "c"), (0, "a"))  # (first score of the band, its first letter)


def score_token(score: int) -> str:
    """The two letters ArtiMuse answers for an integer score in 0..100 (e.g. 0 → ``aa``, 26 → ``ca``)."""
    if not 0 <= score <= 100:
        raise EvalError(f"ArtiMuse scores are integers in 0..100, got {score}")
    start, letter = next((start, letter) for start, letter in _SCORE_BANDS if score >= start)
    return letter + chr(ord("a") + score - start)


SCORE_TOKENS = tuple(score_token(n) for n in range(101))


@dataclass(frozen=True)
class ChatTemplate:
    """A chatml conversation template of InternVL's ``conversation.py`` (``SeparatorStyle.MPT``)."""

    system_message: str
    sep: str
    system_template: str = "<|im_start|>system\n{system_message}"
    user: str = "<|im_start|>user\n"
    assistant: str = "<|im_start|>assistant\n"

    def prompt(self, question: str, system_message: str | None = None) -> str:
        """One user turn followed by the assistant's generation prefix."""
        system = self.system_template.format(system_message=self.system_message if system_message is None
                                             else system_message)
        return system + self.sep + self.user + question + self.sep + self.assistant


# the chatml templates InternVL checkpoints name in ``config.json``; the system messages are part of the prompt
# the model was tuned with, so they are reproduced as released
_INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CHAT_TEMPLATES = {
    "internvl2_5": ChatTemplate(_INTERNVL_SYSTEM, sep="<|im_end|>\n"),
    "Hermes-2": ChatTemplate(_INTERNVL2_SYSTEM, sep="<|im_end|>"),
    "internlm2-chat": ChatTemplate(_INTERNVL2_SYSTEM, sep="<|im_end|>"),
}

# InternVisionConfig's defaults: an original config.json omits what equals them, and they differ from
# transformers' InternVLVisionConfig defaults
_VISION_DEFAULTS = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                        num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                        hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, initializer_factor=0.1)
_LLM_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
# llm_config entries that describe the original file or runtime, not the network
_LLM_DROP = ("architectures", "model_type", "auto_map", "_name_or_path", "transformers_version",
             "attn_implementation", "torch_dtype", "dtype")


def _vision(original: dict) -> dict:
    vision = {**_VISION_DEFAULTS, **original.get("vision_config", {})}
    if vision["norm_type"] not in ("layer_norm", "rms_norm"):
        raise EvalError(f"unsupported InternViT norm_type {vision['norm_type']!r}: expected layer_norm or rms_norm")
    if vision["qk_normalization"] and vision["layer_norm_eps"] != 1e-6:
        # transformers' q/k RMSNorm has a fixed eps of 1e-6, the original uses layer_norm_eps
        raise EvalError(f"InternViT q/k normalisation with layer_norm_eps={vision['layer_norm_eps']} is not "
                        "supported (transformers fixes it at 1e-6)")
    return vision


def input_size(original: dict) -> int:
    """Side of the square tile the model sees (``force_image_size`` or the vision tower's ``image_size``)."""
    return int(original.get("force_image_size") or _vision(original)["image_size"])


def num_image_tokens(original: dict) -> int:
    """``<IMG_CONTEXT>`` tokens per tile: patches per side², downsampled by the pixel shuffle."""
    grid = input_size(original) // int(_vision(original)["patch_size"])
    return int(grid * original.get("downsample_ratio", 0.5)) ** 2


def chat_query(original: dict) -> str:
    """The full prompt of ``InternVLChatModel.score`` for one tile, image tokens expanded."""
    name = original.get("template")
    if name not in CHAT_TEMPLATES:
        raise EvalError(f"unsupported conversation template {name!r}: expected one of {sorted(CHAT_TEMPLATES)}")
    image = IMG_START + IMG_CONTEXT * num_image_tokens(original) + IMG_END
    return CHAT_TEMPLATES[name].prompt(image + "\n" + QUESTION, original.get("system_message"))


def convert_config(original: dict, *, image_token_id: int | None = None):
    """An original ``internvl_chat`` ``config.json`` (as a dict) → transformers ``InternVLConfig``.

    Raises ``EvalError`` for what transformers' InternVL does not compute the same way: ``ps_version`` v1 (its
    pixel shuffle leaves the grid transposed), a ``select_layer`` other than -1, a language model other than
    Qwen2/Llama, a downsample ratio that does not divide the patch grid, unmerged LoRA adapters. ``llm_config``
    passes through (legacy generation fields included); its ``rope_scaling`` only acts beyond
    ``max_position_embeddings``, far past the few-hundred-token score prompt.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import InternVLConfig

    if original.get("model_type", "internvl_chat") != "internvl_chat":
        raise EvalError(f"config.json has model_type {original.get('model_type')!r}, expected 'internvl_chat'")
    if original.get("ps_version", "v1") != "v2":  # InternVLChatConfig's default is v1
        raise EvalError(f"ps_version {original.get('ps_version', 'v1')!r} is not supported: only 'v2' matches "
                        "transformers' pixel shuffle")
    if original.get("use_backbone_lora") or original.get("use_llm_lora"):  # peft-wrapped keys, unmerged adapters
        raise EvalError("LoRA-wrapped InternVL checkpoints are not supported: merge the adapters first")
    if original.get("select_layer", -1) != -1:
        raise EvalError(f"select_layer {original['select_layer']} is not supported: only -1 (the last layer)")
    llm = dict(original.get("llm_config", {}))
    arch = (llm.get("architectures") or [None])[0]
    if arch not in _LLM_TYPES:
        raise EvalError(f"language model {arch!r} is not supported: expected one of {sorted(_LLM_TYPES)}")
    ratio = float(original.get("downsample_ratio", 0.5))
    vision = _vision(original)
    scale = round(1 / ratio)
    if abs(scale * ratio - 1) > 1e-9 or (input_size(original) // int(vision["patch_size"])) % scale:
        raise EvalError(f"downsample_ratio {ratio} must be 1/k with k dividing the patch grid")
    text = {key: value for key, value in llm.items() if key not in _LLM_DROP}
    text.update(model_type=_LLM_TYPES[arch], tie_word_embeddings=False)  # InternVLChatConfig forces untied heads
    vision_config = dict(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
        hidden_act=vision["hidden_act"], layer_norm_eps=vision["layer_norm_eps"], norm_type=vision["norm_type"],
        attention_bias=vision["qkv_bias"], use_qk_norm=vision["qk_normalization"],
        image_size=vision["image_size"], patch_size=vision["patch_size"], num_channels=vision["num_channels"],
        layer_scale_init_value=vision["initializer_factor"],
        use_mean_pooling=True,  # = no final LayerNorm: the original tower ends at its last block
        use_mask_token=False, use_absolute_position_embeddings=True,
    )
    extra = {} if image_token_id is None else {"image_token_id": image_token_id}
    try:
        return InternVLConfig(vision_config=vision_config, text_config=text, downsample_ratio=ratio,
                              image_seq_length=num_image_tokens(original), projector_hidden_act="gelu",
                              vision_feature_layer=-1, vision_feature_select_strategy="default",
                              tie_word_embeddings=False, **extra)
    except (StrictDataclassError, TypeError, ValueError) as err:
        raise EvalError(f"the ArtiMuse config.json does not describe a valid InternVL model: {err}") from err


_VISION = "model.vision_tower."
_LAYER, _TO_LAYER = r"vision_model\.encoder\.layers\.(\d+)\.", _VISION + r"encoder.layer.\1."
# (original key pattern, transformers key template); applied to the whole key, first match wins
_RENAMES = [(re.compile(pattern), target) for pattern, target in [
    (r"vision_model\.embeddings\.class_embedding", _VISION + "embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", _VISION + "embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     _VISION + r"embeddings.patch_embeddings.projection.\1"),
    (_LAYER + r"attn\.proj\.(weight|bias)", _TO_LAYER + r"attention.projection_layer.\2"),
    (_LAYER + r"attn\.([qk])_norm\.weight", _TO_LAYER + r"attention.\2_norm.weight"),
    (_LAYER + r"ls([12])", _TO_LAYER + r"lambda_\2"),
    (_LAYER + r"norm1\.(weight|bias)", _TO_LAYER + r"layernorm_before.\2"),
    (_LAYER + r"norm2\.(weight|bias)", _TO_LAYER + r"layernorm_after.\2"),
    (_LAYER + r"mlp\.(fc[12])\.(weight|bias)", _TO_LAYER + r"mlp.\2.\3"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]]
_QKV = re.compile(_LAYER + r"attn\.qkv\.(weight|bias)")


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``InternVLChatModel`` keys → ``InternVLForConditionalGeneration`` keys (values unchanged).

    The fused ``attn.qkv`` (``[3·C, C]``, rows q | k | v: InternViT reshapes its output to ``[.., 3, heads,
    head_dim]``) is split into ``q_proj``/``k_proj``/``v_proj``. Key-local, so shards convert one at a time.
    An unknown key raises ``EvalError`` naming it.
    """
    out = {}
    for key, value in state.items():
        fused = _QKV.fullmatch(key)
        if fused:
            if value.shape[0] % 3:
                raise EvalError(f"{key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
            layer, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{_VISION}encoder.layer.{layer}.attention.{name}_proj.{kind}"] = part
            continue
        for pattern, target in _RENAMES:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(target)] = value
                break
        else:
            raise EvalError(f"unexpected key {key!r} in the ArtiMuse checkpoint (not part of InternVLChatModel)")
    return out


class ArtiMuseScorer:
    """ArtiMuse's 0-100 aesthetic score of images, as ``InternVLChatModel.score`` computes it (batched)."""

    name = "artimuse"

    def __init__(self, model: nn.Module, tokenizer, query: str, input_size: int, batch_size: int = 1,
                 device: str = "cpu") -> None:
        """``model``: an ``InternVLForConditionalGeneration``; ``query``: the full prompt (:func:`chat_query`)."""
        if batch_size < 1:
            raise EvalError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.input_size, self.batch_size, self.device = input_size, batch_size, device
        # the prompt is the same for every image, so one row of ids serves the whole batch (no padding)
        self.input_ids = tokenizer(query, return_tensors="pt")["input_ids"].to(device)  # [1, L]
        context = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        found = int((self.input_ids == context).sum())
        if context != model.config.image_token_id or found != model.config.image_seq_length:
            raise EvalError(f"the tokenizer gives {found} {IMG_CONTEXT} tokens (id {context}); the model expects "
                            f"{model.config.image_seq_length} (id {model.config.image_token_id})")
        vocab = tokenizer.get_vocab()
        missing = [token for token in SCORE_TOKENS if token not in vocab]
        if missing:
            raise EvalError(f"the tokenizer lacks the ArtiMuse score tokens {missing}: not an ArtiMuse tokenizer")
        self.score_ids = torch.tensor([vocab[token] for token in SCORE_TOKENS], device=device)  # [101]

    def to(self, device: str) -> ArtiMuseScorer:
        """Move to ``device``; the weights keep their dtype (the release's bf16)."""
        self.model.to(device)
        self.input_ids, self.score_ids, self.device = self.input_ids.to(device), self.score_ids.to(device), device
        return self

    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``[N, 3, S, S]`` float32: bicubic resize to S×S (PIL, as torchvision's ``Resize`` on PIL images),
        [0, 1], ImageNet-normalised."""
        side = self.input_size
        tiles = [np.asarray(Image.fromarray(load_rgb(x)).resize((side, side), Image.Resampling.BICUBIC))
                 for x in images]
        pixels = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def last_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` → ``[N, vocab]`` next-token logits after the prompt."""
        ids = self.input_ids.expand(pixel_values.shape[0], -1)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         pixel_values=pixel_values.to(self.device), logits_to_keep=1)
        return out.logits[:, -1]

    def score(self, images: Sequence[ImageLike]) -> np.ndarray:
        """``[N] float64`` in [0, 100]: Σ n · softmax(logits over the 101 score tokens)[n]."""
        weights = torch.arange(len(SCORE_TOKENS), dtype=torch.float64)
        out = []
        for start in range(0, len(images), self.batch_size):
            logits = self.last_logits(self.pixel_values(images[start : start + self.batch_size]))
            out.append(torch.softmax(logits[:, self.score_ids].double().cpu(), dim=-1) @ weights)
        return torch.cat(out).numpy() if out else np.zeros(0)


def tiny_tokenizer():
    """An offline Qwen2 tokenizer: the 256 byte-level symbols, the 101 score tokens and the chat/image tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]
    for token in (*SCORE_TOKENS, *specials):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=specials[1:])


def tiny_original_config(vocab_size: int, image_size: int = 56) -> dict:
    """An original-format ``config.json`` of ArtiMuse's architecture at toy width (2 InternViT-style blocks with
    layer norm and qkv bias as in InternViT-300M, a 2-layer Qwen2 with GQA)."""
    return {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "template": "internvl2_5",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",  # remote code: never run
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "ps_version": "v2", "select_layer": -1, "downsample_ratio": 0.5, "force_image_size": image_size,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,  # unused by score()
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 32, "image_size": image_size, "patch_size": 14, "qkv_bias": True,
                          "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                          "hidden_act": "gelu", "initializer_factor": 1.0},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
                       "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
                       "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 2048,
                       "use_sliding_window": False, "torch_dtype": "bfloat16", "initializer_range": 0.5},
    }


def tiny_artimuse(seed: int = 0) -> ArtiMuseScorer:
    """ArtiMuse's architecture at toy width with random weights, through the same config conversion."""
    from transformers import InternVLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    original = tiny_original_config(len(tokenizer))
    config = convert_config(original, image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    return ArtiMuseScorer(model, tokenizer, chat_query(original), input_size(original))


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _shards(folder: Path) -> list[Path]:
    """The safetensors files of a released folder (sharded via ``model.safetensors.index.json`` or single)."""
    files = checkpoint_files(folder)
    if files is not None:
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise EvalError(f"{folder / SAFETENSORS_LAYOUT[0]} lists non-safetensors files {bad}: ArtiMuse loads "
                            "safetensors only")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise EvalError(f"{folder} lacks the shards {missing}: {FETCH_HINT}")
        return files
    pickles = sorted(path.name for pattern in _PICKLES for path in folder.glob(pattern))
    if pickles:
        raise EvalError(f"{folder} holds only pickled weights {pickles}: ArtiMuse is loaded from safetensors only "
                        f"(pickles can run code); {FETCH_HINT}")
    raise EvalError(f"{folder} has no model.safetensors(.index.json): {FETCH_HINT}")


def load_artimuse(folder: Path, batch_size: int = 1, device: str = "cpu") -> ArtiMuseScorer:
    """The released folder (``config.json`` of type internvl_chat, safetensors shards + index, tokenizer files),
    offline; built on the meta device and loaded strictly in place (no random init, no second copy)."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EvalError(f"{config_file} is missing: {FETCH_HINT}")
    try:
        original = json.loads(config_file.read_text())
    except ValueError as err:
        raise EvalError(f"{config_file} is not valid JSON: {err}") from err
    shards = _shards(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load the ArtiMuse tokenizer from {folder}: {err}; {FETCH_HINT}") from err
    lacking = [token for token in (IMG_START, IMG_END, IMG_CONTEXT) if token not in tokenizer.get_vocab()]
    if lacking:
        raise EvalError(f"the tokenizer in {folder} lacks InternVL's image tokens {lacking}")
    config = convert_config(original, image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    # 8B parameters: built without memory or random init (meta device), then the checkpoint is assigned in
    # place; buffers stay real, since the rotary tables are not in the checkpoint
    with init_empty_weights(include_buffers=False):
        model = InternVLForConditionalGeneration(config)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors = load_file(shard)
        except (OSError, SafetensorError) as err:
            raise EvalError(f"{shard} is not a readable safetensors file ({err}); {FETCH_HINT}") from err
        state.update(convert_checkpoint(tensors))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise EvalError(f"{folder} does not fit ArtiMuse's architecture: missing {missing[:5]}"
                        f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'…' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise EvalError(f"{folder} does not fit the architecture its config.json describes: {err}") from err
    return ArtiMuseScorer(model.eval(), tokenizer, chat_query(original), input_size(original),
                          batch_size=batch_size, device=device)
