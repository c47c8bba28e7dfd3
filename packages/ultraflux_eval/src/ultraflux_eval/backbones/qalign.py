"""Q-Align (Wu et al., 2023, "Q-Align: Teaching LMMs for Visual Scoring via Discrete Text-Defined Levels",
arXiv 2312.17090) on its released architecture: mPLUG-Owl2 (CLIP-style ViT-L/14 at 448 px, a visual abstractor
with 64 learned queries, a LLaMA-2-7B with modality-adaptive K/V projections and norms).

The score is Q-Align's own readout (``q-future/one-align``'s ``score`` method): after the prompt
``USER: How would you rate the quality of this image?\\n<|image|>\\nASSISTANT: The quality of the image is``
the next-token logits of the five level words ("excellent", "good", "fair", "poor", "bad") are softmaxed and
weighted 5…1, so a score lies in [1, 5]. UltraFlux's data filter keeps ``> 4.0``; its table reports 4.85 at 4096².
Images are padded to a square with the CLIP mean colour (``expand2square``) and preprocessed by the checkpoint's
``CLIPImageProcessor`` (448², CLIP normalisation), as upstream does.

The network code is pyiqa's copy of mPLUG-Owl2 (``pyiqa/archs/q_align``, installed ``--no-deps`` with the
``paper`` extra); it is imported lazily. Two adaptations, both outside pyiqa's files:

- pyiqa's ``MPLUGOwl2LlamaForCausalLM.__init__`` downloads the tokenizer from the hub; :func:`_network_class`
  subclasses it with the same modules and no hub access (the tokenizer is loaded from the weights folder).
- Importing it rebinds transformers' Llama attention/decoder classes and ``LlamaModel.forward`` process-wide
  (``replace_llama_modality_adaptive``). :func:`_owl2` undoes that right after the import and re-applies the
  modality-adaptive pieces only while an mPLUG-Owl2 model is built and only to pyiqa's own classes, so any
  other Llama model in the process keeps transformers' code.
- transformers 5 dropped ``PreTrainedModel.invert_attention_mask``, which pyiqa's visual abstractor calls; it is
  restored on that class with transformers 4's definition.

Weights (``q-future/one-align``): its ``config.json``, tokenizer, ``preprocessor_config.json`` and shards; the
checkpoint's keys are this class's, so it loads strictly with no renaming. Safetensors shards are used when the
folder has them; pickled ``.bin`` shards are read with ``torch.load(weights_only=True)`` (tensors only) after
their sha256 matched the manifest. Checked on tiny random models of the same classes, not against the 8B release
(not reachable here).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ultraflux_eval.backbones.checkpoints import (
    PICKLE_LAYOUT,
    SAFETENSORS_LAYOUT,
    checkpoint_files,
    load_state_dict_file,
)
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import ImageLike, load_rgb
from ultraflux_eval.metrics.table import PAPER_EXTRA_HINT

LEVELS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
IMAGE_TOKEN = "<|image|>"
PROMPT = "USER: How would you rate the {task} of this image?\n<|image|>\nASSISTANT: The {task} of the image is"
OWL2_MODULE = "pyiqa.archs.q_align.modeling_mplug_owl2"
# what replace_llama_modality_adaptive() rebinds in transformers' Llama module
# Random weights at the usual init (std 0.02) give level logits that barely depend on the image (all scores ≈ 2.93);
# std 0.5 makes the toy model's scores spread over [1, 3] and differ per image, which is what tests need.
TINY_INIT = 0.5
_LLAMA_NAMES = ("LlamaAttention", "LlamaFlashAttention2", "LlamaSdpaAttention", "LlamaDecoderLayer")


def qalign_readout(level_logits: torch.Tensor) -> torch.Tensor:
    """``[N, 5]`` logits of (excellent, good, fair, poor, bad) → ``[N]`` expected level in [1, 5]."""
    weights = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float32, device=level_logits.device)
    return level_logits.float().softmax(dim=-1) @ weights


@contextlib.contextmanager
def _legacy_config() -> Iterator[None]:
    """pyiqa's LlamaConfig sets transformers 4's ``rope_scaling`` (None); transformers 5 warns on every config."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
        yield


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ``ModuleUtilsMixin.invert_attention_mask``: 1/0 keep mask → additive ``[B, 1, (1,) L]``."""
    extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _bind(module: object, values: dict[str, object]) -> None:
    """Set each name of ``module`` to its value; a None value removes the name."""
    for name, value in values.items():
        if value is None:
            if hasattr(module, name):
                delattr(module, name)
        else:
            setattr(module, name, value)


@functools.cache
def _owl2() -> tuple[object, dict[str, object]]:
    """pyiqa's mPLUG-Owl2 module, imported with transformers' Llama left as it was.

    Returns the module and the modality-adaptive replacements (names of transformers' Llama module → pyiqa's).
    """
    import transformers.models.llama.configuration_llama as llama_config
    import transformers.models.llama.modeling_llama as llama

    saved = {name: getattr(llama, name, None) for name in _LLAMA_NAMES}
    saved_config = llama_config.LlamaConfig
    saved_forward = (llama.LlamaModel.forward, llama.LlamaForCausalLM.forward)
    try:
        owl2 = importlib.import_module(OWL2_MODULE)
    except ImportError as err:
        raise EvalError(f"the qalign metric needs pyiqa's mPLUG-Owl2 code: {PAPER_EXTRA_HINT} ({err})") from err
    adaptive = {name: getattr(llama, name) for name in _LLAMA_NAMES}
    model_forward = llama.LlamaModel.forward
    _bind(llama, saved)
    llama_config.LlamaConfig = saved_config
    llama.LlamaModel.forward, llama.LlamaForCausalLM.forward = saved_forward
    # pyiqa's own Llama model keeps the modality-adaptive forward (its causal-LM class defines its own forward)
    owl2.MPLUGOwl2LlamaModel.forward = model_forward
    importlib.import_module("pyiqa.archs.q_align.visual_encoder").MplugOwlVisualAbstractorModel.\
        invert_attention_mask = _invert_attention_mask
    return owl2, adaptive


@contextlib.contextmanager
def _modality_adaptive() -> Iterator[object]:
    """While building: transformers' ``LlamaModel.__init__`` takes pyiqa's multiway decoder layers."""
    import transformers.models.llama.modeling_llama as llama

    owl2, adaptive = _owl2()
    saved = {name: getattr(llama, name, None) for name in adaptive}
    _bind(llama, adaptive)
    try:
        yield owl2
    finally:
        _bind(llama, saved)


@functools.cache
def _network_class() -> type:
    """pyiqa's ``MPLUGOwl2LlamaForCausalLM`` without the hub download in its ``__init__``."""
    from torch import nn
    from transformers import LlamaForCausalLM

    owl2, _ = _owl2()

    class QAlignNetwork(owl2.MPLUGOwl2LlamaForCausalLM):
        def __init__(self, config) -> None:
            # what the parent's __init__ builds, minus LlamaTokenizer/CLIPImageProcessor.from_pretrained(<hub id>)
            super(LlamaForCausalLM, self).__init__(config)
            self.model = owl2.MPLUGOwl2LlamaModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    return QAlignNetwork


def build_network(config) -> torch.nn.Module:
    """An mPLUG-Owl2 causal LM for ``config`` (an ``MPLUGOwl2Config``), randomly initialised."""
    with _modality_adaptive():
        return _network_class()(config)


def image_token_ids(prompt: str, tokenizer) -> list[int]:
    """Token ids of ``prompt`` with Q-Align's image placeholder id (-200) where ``<|image|>`` stands."""
    owl2, _ = _owl2()
    return owl2.tokenizer_image_token(prompt, tokenizer, owl2.IMAGE_TOKEN_INDEX)


def level_token_ids(tokenizer) -> list[int]:
    """The id of each level word; each must be one token (it is in LLaMA's vocabulary)."""
    ids = []
    for word in LEVELS:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise EvalError(f"the Q-Align tokenizer splits {word!r} into {len(pieces)} tokens; it must be one")
        ids.append(pieces[0])
    return ids


def expand_to_square(rgb: np.ndarray, fill: Sequence[float]) -> Image.Image:
    """Pad ``[H, W, 3] uint8`` to a centred square filled with ``fill`` (0-1 per channel), as Q-Align does."""
    image = Image.fromarray(rgb)
    side = max(image.size)
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (side, side), tuple(int(c * 255) for c in fill))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class QAlignScorer:
    """Q-Align level expectation per image (``[1, 5]``; ``task`` "quality" or "aesthetics")."""

    name = "qalign"

    def __init__(self, network: torch.nn.Module, tokenizer, processor, task: str = "quality",
                 batch_size: int = 4, device: str = "cpu") -> None:
        if task not in ("quality", "aesthetics"):
            raise EvalError(f"Q-Align task must be 'quality' or 'aesthetics', got {task!r}")
        self.network, self.tokenizer, self.processor = network.eval(), tokenizer, processor
        self.batch_size = batch_size
        self.to(device)
        self.prompt_ids = torch.tensor(image_token_ids(PROMPT.format(task=task), tokenizer), dtype=torch.long)
        self.level_ids = level_token_ids(tokenizer)

    def to(self, device: str) -> QAlignScorer:
        """Move to ``device``: fp16 on CUDA (as upstream scores), fp32 elsewhere."""
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.network.to(device=device, dtype=dtype)
        self.device = device
        return self

    @torch.no_grad()
    def level_logits(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``[N, 5]`` next-token logits of the level words after the prompt."""
        dtype = next(self.network.parameters()).dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            squares = [expand_to_square(load_rgb(x), self.processor.image_mean)
                       for x in images[start : start + self.batch_size]]
            pixels = self.processor(images=squares, return_tensors="pt")["pixel_values"].to(self.device, dtype)
            ids = self.prompt_ids.to(self.device).repeat(len(squares), 1)  # one prompt: no padding needed
            logits = self.network(input_ids=ids, images=pixels)["logits"][:, -1, self.level_ids]
            out.append(logits.float().cpu())
        return torch.cat(out)

    def score(self, images: Sequence[ImageLike]) -> np.ndarray:
        """``[N] float64`` Q-Align scores."""
        if len(images) == 0:
            raise EvalError("no images to score")
        return qalign_readout(self.level_logits(images)).double().numpy()


def _tiny_tokenizer():
    """A LLaMA-like word-level tokenizer (BOS prepended) covering the prompt and the level words, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PROMPT.format(task="quality").replace(IMAGE_TOKEN, " ").split())
                   | set(PROMPT.format(task="aesthetics").replace(IMAGE_TOKEN, " ").split()) | set(LEVELS))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(vocab_size: int, image_size: int = 28):
    """mPLUG-Owl2's configuration at toy width: 1-layer ViT (patch 14), 1-layer abstractor (4 queries),
    2-layer modality-adaptive LLaMA."""
    owl2, _ = _owl2()
    visual = {
        "visual_model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=image_size, patch_size=14, initializer_range=TINY_INIT),
        "visual_abstractor": dict(num_learnable_queries=4, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32, grid_size=2,
                                  initializer_range=TINY_INIT),
    }
    with _legacy_config():
        return owl2.MPLUGOwl2Config(visual_config=visual, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                    initializer_range=TINY_INIT)


def tiny_qalign(seed: int = 0, image_size: int = 28) -> QAlignScorer:
    """Q-Align's architecture at toy width, seeded random weights."""
    from transformers import CLIPImageProcessor

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    network = build_network(tiny_config(len(tokenizer.get_vocab()), image_size)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return QAlignScorer(network, tokenizer, processor)


def load_qalign(folder: Path, task: str = "quality", device: str = "cpu") -> QAlignScorer:
    """``q-future/one-align`` from a local folder (config, tokenizer, preprocessor, shards), strictly offline."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, CLIPImageProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"no Q-Align weights folder {folder}: run `ultraflux-eval weights fetch --only qalign`")
    owl2, _ = _owl2()
    try:
        with _legacy_config():  # AutoTokenizer reads config.json too
            config = owl2.MPLUGOwl2Config.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load Q-Align's config/tokenizer/preprocessor from {folder}: {err}") from err
    shards = checkpoint_files(folder, (SAFETENSORS_LAYOUT, PICKLE_LAYOUT))  # safetensors when the repo has them
    if shards is None:
        raise EvalError(f"{folder} has no Q-Align checkpoint (model.safetensors[.index.json] or "
                        "pytorch_model.bin[.index.json]): run `ultraflux-eval weights fetch --only qalign`")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise EvalError(f"Q-Align shard {shard} is missing: run `ultraflux-eval weights fetch --only qalign`")
        state.update(load_state_dict_file(shard))
    # 8B parameters: built on the meta device, then the checkpoint is assigned in place (rotary buffers stay real)
    with init_empty_weights(include_buffers=False):
        network = build_network(config)
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise EvalError(f"the checkpoint in {folder} does not fit mPLUG-Owl2: {err}") from err
    return QAlignScorer(network, tokenizer, processor, task=task, device=device)
