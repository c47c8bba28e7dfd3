"""TFLOP/s and MFU of one real-size Flux block (forward + backward), dual- and single-stream, bf16.

FLUX.1-dev widths (3072 = 24 × 128, MLP 12288), random weights, the model's own attention processor and
Resonance-YaRN RoPE. FLOPs per block forward: 24·D²·S for the token-wise matmuls (q, k, v, out and the MLP
in both block kinds) plus 4·S²·D for attention (QKᵀ and PV), S = image + text tokens; backward is 2× that.
MFU is against the GPU's dense bf16 peak (``--peak-tflops``, H100/H200 SXM: 989).

    python -m benchmarks.bench_block [--tokens 4096 16384] [--text-tokens 512] [--device cuda]

Writes ``benchmarks/results/block_<device>.{csv,json}`` (or ``--out``). Without CUDA on ``--device cuda`` it
writes one row with status ``skipped`` and exits 0, so a dry run of the GPU check passes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.report import RESULTS, print_rows, save_rows
from benchmarks.timing import median_seconds

H200_BF16_TFLOPS = 989.0


def block_flops(dim: int, tokens: int) -> float:
    """Forward FLOPs of one Flux block (either kind) over ``tokens`` joint tokens."""
    return 24 * dim * dim * tokens + 4 * tokens * tokens * dim


def real_width_model(device: torch.device, dtype: torch.dtype, double: int = 1, single: int = 1):
    """A FLUX.1-dev-width UltraFlux transformer with ``double``/``single`` blocks, random weights, built in place."""
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    with torch.device("meta"):
        model = UltraFluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def image_text_ids(image_tokens: int, text_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Square-ish image grid ids [N, 3] and zero text ids [T, 3]."""
    width = int(image_tokens**0.5)
    while image_tokens % width:
        width -= 1
    ids = torch.zeros(image_tokens, 3, device=device)
    ids[:, 1] = torch.arange(image_tokens, device=device) // width
    ids[:, 2] = torch.arange(image_tokens, device=device) % width
    return ids, torch.zeros(text_tokens, 3, device=device)


def measure(model, image_tokens: int, text_tokens: int, device: torch.device, repeats: int) -> list[dict]:
    dtype = next(model.parameters()).dtype
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    img_ids, txt_ids = image_text_ids(image_tokens, text_tokens, device)
    rotary = model.pos_embed(torch.cat([txt_ids, img_ids]))
    gen = torch.Generator(device).manual_seed(1)
    hidden = torch.randn(1, image_tokens, dim, generator=gen, device=device, dtype=dtype, requires_grad=True)
    context = torch.randn(1, text_tokens, dim, generator=gen, device=device, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, dim, generator=gen, device=device, dtype=dtype)
    rows = []
    for kind, block in (("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])):

        def step(block=block) -> None:
            enc, img = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
            torch.autograd.backward((enc, img), (torch.ones_like(enc), torch.ones_like(img)))

        seconds = median_seconds(step, device, warmup=2, repeats=repeats)
        flops = 3 * block_flops(dim, image_tokens + text_tokens)
        rows.append({"block": kind, "image_tokens": image_tokens, "text_tokens": text_tokens,
                     "fwd_bwd_ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "status": "ok"})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="image tokens (4096² = 16384)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        rows = [{"block": "-", "image_tokens": 0, "text_tokens": 0, "fwd_bwd_ms": None, "tflops": None, "mfu": None,
                 "status": "skipped: no CUDA device"}]
        save_rows(rows, f"block_{device.type}", args.out)
        print("bench_block: skipped (no CUDA device)")
        return rows
    model = real_width_model(device, torch.bfloat16)
    rows = []
    for tokens in args.tokens:
        rows += measure(model, tokens, args.text_tokens, device, args.repeats)
    for row in rows:
        row["mfu"] = row["tflops"] / args.peak_tflops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    paths = save_rows(rows, f"block_{device.type}", args.out)
    print_rows(rows, ("block", "image_tokens", "text_tokens", "fwd_bwd_ms", "tflops", "mfu"),
               title=f"Flux block fwd+bwd on {name}, bf16 (MFU vs {args.peak_tflops:g} TFLOP/s)")
    print(f"wrote {paths[0]} and {paths[1]}")
    return rows


if __name__ == "__main__":
    main()
