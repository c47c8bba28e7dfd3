"""Resonance 2D RoPE + YaRN: official fixtures, an independent scalar re-derivation, and edge cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from ultraflux_model.modules.rope import ResonanceYarnPosEmbed, resonance_yarn_1d, rope_frequencies


def test_rope_1d_matches_official_tables(reference_fixtures):
    tables = load_file(reference_fixtures / "rope_1d" / "rope_1d.safetensors")
    entries = json.loads((reference_fixtures / "rope_1d" / "manifest.json").read_text())["entries"]
    assert len(entries) == 10
    for e in entries:
        cos, sin = resonance_yarn_1d(e["dim"], torch.arange(e["current_len"]), e["train_len"])
        freqs, mscale = rope_frequencies(e["dim"], e["train_len"], e["current_len"])
        torch.testing.assert_close(cos, tables[f"{e['key']}.cos"], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, tables[f"{e['key']}.sin"], atol=1e-6, rtol=0)
        torch.testing.assert_close(freqs, tables[f"{e['key']}.freqs"], atol=1e-8, rtol=0)
        assert mscale == pytest.approx(e["mscale_cos_row0"], abs=1e-6)
        assert (e["current_len"] > e["train_len"]) == e["yarn_branch_taken"]


def _grid_ids(h: int, w: int, txt_len: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([torch.zeros(h * w), r.flatten().float(), c.flatten().float()], 1)
    return torch.cat([torch.zeros(txt_len, 3), img])


def test_pos_embed_matches_official_including_variants(reference_fixtures):
    data = load_file(reference_fixtures / "pos_embed" / "pos_embed.safetensors")
    entries = json.loads((reference_fixtures / "pos_embed" / "manifest.json").read_text())["entries"]
    assert {e["key"] for e in entries} >= {"h64_w64", "variant_bhw1536x4096_twh_h96_w160", "variant_method_base_h96_w160"}
    for e in entries:
        h, w = e["grid_hw_tokens"]
        ids = _grid_ids(h, w, e["txt_len"])
        rows = data[f"{e['key']}.row_index"]
        torch.testing.assert_close(ids[rows], data[e.get("ids_key") or f"{e['key']}.ids"], atol=0, rtol=0)
        embed = ResonanceYarnPosEmbed(
            axes_dim=(16, 56, 56), train_tokens_hw=tuple(e["base_patches_hw"]), axis_order=e["axis_order"], method=e["method"]
        )
        cos, sin = embed(ids)
        assert cos.shape == (e["seq_len"], 128) and cos.dtype == torch.float32
        torch.testing.assert_close(cos[rows], data[f"{e['key']}.cos"], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[rows], data[f"{e['key']}.sin"], atol=1e-6, rtol=0)


def _scalar_reference(dim: int, span: int, train_len: int, theta: float = 10000.0) -> tuple[list[float], float]:
    """docs/design.md §3 written out pair by pair with Python floats (independent of the module's vectorised code)."""
    half = dim // 2
    omegas = [theta ** (-2 * k / dim) for k in range(half)]
    if span <= train_len:
        return omegas, 1.0
    s = span / train_len
    snapped = []
    for om in omegas:
        r = train_len * om / (2 * math.pi)
        snapped.append(2 * math.pi * round(r) / train_len if r >= 1 else om)
    new_base = theta * s ** (dim / (dim - 2))

    def bound(rot: float) -> float:
        return dim * math.log(train_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

    def ramp(lo_rot: float, hi_rot: float, k: int) -> float:
        lo, hi = max(math.floor(bound(lo_rot)), 0), min(math.ceil(bound(hi_rot)), dim - 1, half)
        hi = hi + 0.001 if hi == lo else hi
        return min(max((k - lo) / (hi - lo), 0.0), 1.0)

    out = []
    for k, om in enumerate(snapped):
        ntk = new_base ** (math.log(om) / math.log(theta))
        beta = 1 - ramp(1.25, 0.75, k)
        f = (om / s) * (1 - beta) + ntk * beta
        gamma = 1 - ramp(16, 2, k)
        out.append(f * (1 - gamma) + om * gamma)
    return out, 1 + 0.1 * math.log(s)


@pytest.mark.parametrize("dim,span,train_len", [(56, 200, 64), (24, 77, 48), (128, 300, 128), (12, 9, 4), (56, 65, 64)])
def test_frequencies_agree_with_scalar_rederivation(dim, span, train_len):
    freqs, mscale = rope_frequencies(dim, train_len, span)
    expected, expected_mscale = _scalar_reference(dim, span, train_len)
    torch.testing.assert_close(freqs, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert mscale == pytest.approx(expected_mscale, rel=1e-12)


def test_axis_uses_span_of_all_ids_and_text_axis_never_yarns():
    embed = ResonanceYarnPosEmbed(axes_dim=(8, 12, 12), train_tokens_hw=(4, 8))
    ids = _grid_ids(6, 5, txt_len=3)  # rows span 6 > 4 (YaRN), cols span 5 <= 8 (plain)
    cos, _ = embed(ids)
    rows_cos, _ = resonance_yarn_1d(12, ids[:, 1], train_len=4)
    cols_cos, _ = resonance_yarn_1d(12, ids[:, 2], train_len=10**6)
    text_cos, _ = resonance_yarn_1d(8, ids[:, 0], train_len=1)
    torch.testing.assert_close(cos[:, 8:20], rows_cos, atol=0, rtol=0)
    torch.testing.assert_close(cos[:, 20:32], cols_cos, atol=0, rtol=0)
    torch.testing.assert_close(cos[:, :8], text_cos, atol=0, rtol=0)
    assert cos[0, 8].item() == pytest.approx(1 + 0.1 * math.log(6 / 4), abs=1e-6)  # mscale on the YaRN axis


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="axis_order"):
        ResonanceYarnPosEmbed(axis_order="h-w-t")
    with pytest.raises(ValueError, match="method"):
        ResonanceYarnPosEmbed(method="ntk-by-parts")
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7, 4, 8)
    with pytest.raises(ValueError, match=r"\[S, 3\]"):
        ResonanceYarnPosEmbed()(torch.zeros(5, 2))
