"""HPSv3 (Ma et al., 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"), loaded over transformers'
own Qwen2-VL classes.

The released model (``MizzenAI/HPSv3``: ``HPSv3.safetensors``) is Qwen2-VL-7B-Instruct with a ``<|Reward|>``
token and a "ranknet" head ``Linear(h, 1024) → ReLU → Dropout → Linear(1024, 16) → ReLU → Linear(16, 2)`` on the
last hidden state at that token; the head outputs (μ, σ) of the preference score and HPSv3 reports μ. The
``hpsv3`` wheel pins transformers 4.45.2, so we do not install it: this module rebuilds its inference path
(``hpsv3/inference.py``: instruction prompt, 256·28·28-pixel images, special-token pooling) and maps the
checkpoint's transformers-4.45 key layout (``visual.*``, ``model.*``) onto transformers 5's
``Qwen2VLModel`` (``visual.*``, ``language_model.*``).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import ImageLike, load_rgb

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # HPSv3 feeds every image at exactly this many pixels (min_pixels = max_pixels)
# The prompt HPSv3 was trained with (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION + prompt_with_special_token);
# the score depends on it, so it is reproduced as released.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 - verbatim, trailing spaces included
RATING_PROMPT = f"""
Please provide the overall ratings of this image: {REWARD_TOKEN}

END
"""
# what Qwen2-VL-Instruct's chat template renders for one user turn (image, then text) with the generation prompt
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def ranknet_head(hidden: int, outputs: int = 2) -> nn.Sequential:
    """HPSv3's default "ranknet" head: ``[.., hidden]`` → ``[.., outputs]`` (μ, σ)."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, outputs))


class HPSv3Reward(nn.Module):
    """Qwen2-VL backbone + ranknet head pooled at the ``<|Reward|>`` token: processor batch → ``[B]`` μ."""

    def __init__(self, backbone: nn.Module, reward_token_id: int) -> None:
        super().__init__()
        self.model = backbone
        self.rm_head = ranknet_head(backbone.config.text_config.hidden_size).float()
        self.reward_token_id = reward_token_id

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """``extra``: whatever else the processor returns for the backbone (e.g. ``mm_token_type_ids``)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, **extra).last_hidden_state
        logits = self.rm_head(hidden.float())  # [B, L, 2]
        mask = input_ids == self.reward_token_id
        if not torch.equal(mask.sum(dim=1), torch.ones_like(mask.sum(dim=1))):
            raise EvalError(f"every HPSv3 input needs exactly one {REWARD_TOKEN} token")
        return logits[mask][:, 0]


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``HPSv3.safetensors`` keys (transformers 4.45 ``Qwen2VLForConditionalGeneration`` subclass) → ours."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            out["model." + key] = value
        elif key.startswith("model."):
            out["model.language_model." + key.removeprefix("model.")] = value
        elif key.startswith("rm_head."):
            out[key] = value
        elif not key.startswith("lm_head."):  # the LM head is unused by the reward
            raise EvalError(f"unexpected key {key!r} in the HPSv3 checkpoint")
    return out


class HPSv3Scorer:
    """HPSv3 μ of (image, prompt) pairs, the way ``hpsv3.inference.HPSv3RewardInferencer.reward`` computes it."""

    name = "hpsv3"

    def __init__(self, reward: HPSv3Reward, processor, pixels: int = PIXELS, batch_size: int = 1,
                 device: str = "cpu") -> None:
        self.reward, self.processor, self.pixels = reward.to(device).eval(), processor, pixels
        self.batch_size, self.device = batch_size, device

    def _image(self, rgb: np.ndarray) -> Image.Image:
        """qwen-vl-utils' ``fetch_image`` with min_pixels = max_pixels: bicubic resize to the 28-px grid."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        height, width = smart_resize(rgb.shape[0], rgb.shape[1], factor=28, min_pixels=self.pixels,
                                     max_pixels=self.pixels)
        return Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)

    def score(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> np.ndarray:
        """``[N] float64`` HPSv3 scores (μ)."""
        if len(images) != len(prompts):
            raise EvalError(f"{len(images)} images but {len(prompts)} prompts: they must pair one to one")
        out = []
        for start in range(0, len(images), self.batch_size):
            rgbs = [load_rgb(x) for x in images[start : start + self.batch_size]]
            texts = [CHAT.format(text=INSTRUCTION.format(text_prompt=p) + RATING_PROMPT)
                     for p in prompts[start : start + self.batch_size]]
            batch = self.processor(text=texts, images=[self._image(x) for x in rgbs], padding=True,
                                   return_tensors="pt").to(self.device)
            out.append(self.reward(**batch).double().cpu())
        return torch.cat(out).numpy()


def _tiny_processor(pixels: int):
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", REWARD_TOKEN]
    vocab = {ch: i for i, ch in enumerate(sorted(set(string.printable)))}
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    images = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def tiny_hpsv3(seed: int = 0, pixels: int = 56 * 56) -> HPSv3Scorer:
    """HPSv3's architecture at toy width (2-layer Qwen2-VL, 1-block vision tower, character tokenizer)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    processor = _tiny_processor(pixels)
    vocab = processor.tokenizer.get_vocab()
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
    )
    torch.manual_seed(seed)
    reward = HPSv3Reward(Qwen2VLModel(config).eval(), vocab[REWARD_TOKEN])
    return HPSv3Scorer(reward, processor, pixels=pixels)


def load_hpsv3(folder: Path, pixels: int = PIXELS) -> HPSv3Scorer:
    """A folder with Qwen2-VL-7B-Instruct's ``config.json`` + processor files and ``HPSv3.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLModel

    folder = Path(folder)
    weights = folder / "HPSv3.safetensors"
    if not weights.is_file():
        raise EvalError(f"{weights} is missing: run `ultraflux-eval weights fetch --only hpsv3 --allow-unpinned`")
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        config = Qwen2VLConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load the Qwen2-VL processor/config from {folder}: {err}") from err
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    with safe_open(weights, "pt") as handle:  # HPSv3 resized the embeddings to its tokenizer (+ <|Reward|>)
        config.text_config.vocab_size = handle.get_slice("model.embed_tokens.weight").get_shape()[0]
    from accelerate import init_empty_weights

    # 8B parameters: built without memory or random init (parameters on the meta device), then the checkpoint
    # is assigned in place; buffers stay real, since the rotary tables are not in the checkpoint
    with init_empty_weights(include_buffers=False):
        reward = HPSv3Reward(Qwen2VLModel(config), processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
    try:
        reward.load_state_dict(convert_checkpoint(load_file(weights)), strict=True, assign=True)
    except RuntimeError as err:
        raise EvalError(f"{weights} does not fit Qwen2-VL + the HPSv3 head: {err}") from err
    reward.rm_head.float()
    return HPSv3Scorer(reward.eval(), processor, pixels=pixels)
