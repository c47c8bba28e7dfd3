"""LoRA adapters made the way training makes them: peft layers on the tiny transformer, saved through the adapter
contract (``ultraflux_model.lora.adapters.save_adapter``), with random nonzero ``lora_B`` so they change images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_adapter(checkpoint: Path, out: Path, *, preset: str = "attention", rank: int = 4, alpha: float = 8.0,
                 seed: int = 0, std: float = 0.3, base_fingerprint: str | None = None) -> Path:
    """An adapter folder for ``checkpoint``'s transformer (base fingerprint: its ``transformer/`` folder's content hash,
    as the trainer records it)."""
    from peft import LoraConfig
    from ultraflux_model.checkpoint.layout import fingerprint
    from ultraflux_model.lora.adapters import save_adapter
    from ultraflux_model.lora.targets import target_modules
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    transformer = UltraFluxTransformer2DModel.from_pretrained(checkpoint / "transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules(preset),
                                       init_lora_weights=True))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:  # A and B both random: B = 0 (peft's init) would make a no-op adapter
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    meta = {"base": str(checkpoint), "base_fingerprint": base_fingerprint or fingerprint(checkpoint / "transformer"),
            "rank": rank, "alpha": alpha, "targets": preset, "method": "lora"}  # fmt: skip
    return save_adapter(transformer, out, meta)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An attention-only adapter (rank 4, alpha 8: alpha ≠ rank, so a reader that drops alpha is caught)."""
    return make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "style-a")


@pytest.fixture(scope="session")
def tiny_adapter_b(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second adapter on every linear layer (rank 2, alpha 2), other weights."""
    return make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "style-b", preset="all_linear", rank=2,
                        alpha=2.0, seed=1)
