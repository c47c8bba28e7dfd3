"""One LoRA step on a stub layer equals the formulas written by hand: y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ, its gradients,
and one AdamW update; the base weights get no gradient and stay bit-identical. Also the adapter folder round trip."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from safetensors.torch import load_file
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.lora.adapters import (
    ADAPTER_FILE,
    META_FILE,
    add_lora,
    load_adapter_state,
    save_adapter,
)
from ultraflux_model.lora.targets import PRESETS, target_modules


class Attn(torch.nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(dim, out)
        self.to_k = torch.nn.Linear(dim, out)  # not targeted below: must stay frozen and untouched


class Stub(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self, dim: int = 6, out: int = 5) -> None:
        super().__init__()
        self.attn = Attn(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.to_q(x) + 0.0 * self.attn.to_k(x)


RANK, ALPHA, LR, WD, BETAS, EPS = 2, 3.0, 1e-2, 0.1, (0.9, 0.999), 1e-8


def test_one_lora_step_matches_the_hand_written_reference() -> None:
    torch.manual_seed(0)
    model = Stub().double()
    trainable = add_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=["attn.to_q"])
    assert trainable == ["attn.to_q.lora_A.default.weight", "attn.to_q.lora_B.default.weight"]
    layer = model.attn.to_q
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    k_before = {n: p.detach().clone() for n, p in model.attn.to_k.named_parameters()}
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    assert torch.count_nonzero(B) == 0  # peft starts B at zero: the adapted model starts equal to the base
    with torch.no_grad():  # a B away from zero, so A gets a gradient too
        B.copy_(torch.randn_like(B))
    A0, B0 = A.detach().clone(), B.detach().clone()

    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=WD)
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    optimizer.step()

    # by hand
    s = ALPHA / RANK
    y = x @ W.T + b + s * (x @ A0.T) @ B0.T
    torch.testing.assert_close(loss.detach(), ((y - target) ** 2).mean())
    dy = 2 * (y - target) / y.numel()
    g_b = s * dy.T @ (x @ A0.T)  # [out, r]
    g_a = s * (dy @ B0).T @ x  # [r, in]

    def adamw(p0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        m_hat = (1 - BETAS[0]) * g / (1 - BETAS[0])
        v_hat = (1 - BETAS[1]) * g * g / (1 - BETAS[1])
        return p0 * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)

    torch.testing.assert_close(A.detach(), adamw(A0, g_a), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(B.detach(), adamw(B0, g_b), rtol=1e-12, atol=1e-14)
    # only the adapters got gradients; the base is bit-identical
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
    assert torch.equal(layer.base_layer.weight, W) and torch.equal(layer.base_layer.bias, b)
    assert all(torch.equal(p, k_before[n]) for n, p in model.attn.to_k.named_parameters())


def test_adapter_folder_round_trip_and_refusals(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Stub()
    add_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=["attn.to_q", "attn.to_k"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    meta = {"base": "stub", "base_fingerprint": "f" * 64, "rank": RANK, "alpha": ALPHA, "targets": ["attn.to_q"]}
    out = save_adapter(model, tmp_path / "adapter", meta)
    keys = sorted(load_file(str(out / ADAPTER_FILE)))
    assert keys == [f"transformer.attn.{m}.lora_{ab}.weight" for m in ("to_k", "to_q") for ab in "AB"]
    assert json.loads((out / META_FILE).read_text())["method"] == "lora"

    other = Stub()
    add_lora(other, rank=RANK, alpha=ALPHA, dropout=0.0, targets=["attn.to_q", "attn.to_k"])
    assert load_adapter_state(other, out)["base"] == "stub"
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in mine if "lora_" in n)

    wrong_rank = Stub()
    add_lora(wrong_rank, rank=RANK + 1, alpha=ALPHA, dropout=0.0, targets=["attn.to_q", "attn.to_k"])
    with pytest.raises(UltraFluxError, match="same rank"):
        load_adapter_state(wrong_rank, out)
    fewer = Stub()
    add_lora(fewer, rank=RANK, alpha=ALPHA, dropout=0.0, targets=["attn.to_q"])
    with pytest.raises(UltraFluxError, match="unexpected"):
        load_adapter_state(fewer, out)
    with pytest.raises(UltraFluxError, match="lacks"):
        save_adapter(model, tmp_path / "bad", {"base": "stub"})
    with pytest.raises(UltraFluxError, match="has no pytorch_lora_weights.safetensors"):
        load_adapter_state(other, tmp_path)


def test_presets_resolve_on_the_transformer() -> None:
    from ultraflux_model.checkpoint.tiny import tiny_transformer

    counts = {}
    for preset in PRESETS:
        model = tiny_transformer()
        counts[preset] = len(add_lora(model, rank=2, alpha=2.0, dropout=0.0, targets=target_modules(preset)))
        assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert counts["attention"] < counts["attention_mlp"] < counts["all_linear"]
    linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_transformer().modules())
    assert counts["all_linear"] == 2 * linear  # every linear layer: one A and one B each
    with pytest.raises(UltraFluxError, match="preset"):
        target_modules("everything")
