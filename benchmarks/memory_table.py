"""Peak GPU memory of one generation by offload mode and VAE decode mode at 1K, 2K and 4K (bf16).

What is exact and what is estimated:
* weights: parameter counts of the real-size configs (Flux-dev DiT with the guidance embedding, T5-v1.1-XXL
  encoder, CLIP-L text model, the F16 VAE), built on the meta device, × 2 bytes (bf16): exact;
* VAE decode activations: measured on CPU in fp32 by ``bench_vae_decode`` (``results/vae_decode.json``),
  halved for bf16; a size with no measurement there is scaled from the largest measured one by pixel count;
* denoising activations: estimated, ≈ 110 kB per token in bf16 (the widest single block: residual stream,
  q/k/v, attention output, the 4× MLP and the concat, with SDPA's memory-efficient attention).
Offload: ``none`` keeps everything on the GPU; ``model`` moves one component at a time (peak = the largest
component plus its phase's activations); ``sequential`` streams submodules (peak ≈ the largest leaf module
plus activations).

    python -m benchmarks.memory_table          # writes results/memory_table.{csv,json}, prints a Markdown table
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}
TEXT_TOKENS = 512
DENOISE_BYTES_PER_TOKEN = 110e3  # estimate, see the module docstring
GB = 1 << 30


def component_weights_gb() -> tuple[dict[str, float], float]:
    """bf16 bytes of each component of the released pipeline, and of its largest leaf module (all in GB)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    with torch.device("meta"):
        models = {
            "transformer": UltraFluxTransformer2DModel(guidance_embeds=True),
            "text_encoder_2": T5EncoderModel(T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                                      vocab_size=32128, feed_forward_proj="gated-gelu")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, projection_dim=768)),
            "vae": UltraFluxAutoencoderKL(),
        }  # fmt: skip
    sizes = {name: sum(p.numel() for p in m.parameters()) * 2 / GB for name, m in models.items()}
    leaf = max(
        sum(p.numel() for p in mod.parameters(recurse=False)) * 2 / GB
        for m in models.values() for mod in m.modules()
    )  # fmt: skip
    return sizes, leaf


def decode_gb(size: int, mode: str, measured: list[dict]) -> tuple[float, bool]:
    """bf16 decode activations (GB) and whether they come from a measurement at this size."""
    rows = [r for r in measured if r["mode"] == mode and r["status"].startswith("ok") and r["dtype"] == "fp32"]
    exact = next((r for r in rows if r["size"] == size), None)
    if exact is not None:
        return exact["peak_extra_gb"] / 2, True
    largest = max(rows, key=lambda r: r["size"])
    return largest["peak_extra_gb"] / 2 * (size / largest["size"]) ** 2, False


def main() -> None:
    weights, leaf = component_weights_gb()
    measured = json.loads((RESULTS / "vae_decode.json").read_text())
    rows = []
    for label, size in SIZES.items():
        tokens = (size // 32) ** 2 + TEXT_TOKENS
        denoise = tokens * DENOISE_BYTES_PER_TOKEN / GB
        for mode in ("full", "tiled"):
            decode, decode_measured = decode_gb(size, mode, measured)
            phases = {"denoise": ("transformer", denoise), "decode": ("vae", decode)}
            for offload in ("none", "model", "sequential"):
                if offload == "none":
                    peak = sum(weights.values()) + max(denoise, decode)
                elif offload == "model":
                    peak = max(max(weights["text_encoder_2"], weights["text_encoder"]),
                               *(weights[c] + act for c, act in phases.values()))  # fmt: skip
                else:
                    peak = leaf + max(denoise, decode)
                rows.append({"size": label, "pixels": f"{size}x{size}", "offload": offload, "vae_decode": mode,
                             "peak_gb": round(peak, 1), "decode_gb": round(decode, 2),
                             "decode": "measured (CPU fp32 / 2)" if decode_measured else "estimated",
                             "denoise_gb": round(denoise, 2)})  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_table.json").write_text(json.dumps({"weights_gb": weights, "largest_leaf_gb": leaf, "rows": rows}, indent=2) + "\n")
    with (RESULTS / "memory_table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("weights (bf16 GB): " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items()) + f"; largest leaf {leaf:.2f}")
    print("| size | VAE decode | decode activations | offload none | offload model | offload sequential |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in SIZES:
        for mode in ("full", "tiled"):
            sel = {r["offload"]: r for r in rows if r["size"] == label and r["vae_decode"] == mode}
            r = sel["none"]
            mark = "" if r["decode"].startswith("measured") else " (est.)"
            print(f"| {label} | {mode} | {r['decode_gb']} GB{mark} | {sel['none']['peak_gb']} GB | "
                  f"{sel['model']['peak_gb']} GB | {sel['sequential']['peak_gb']} GB |")


if __name__ == "__main__":
    main()
