"""Training-step throughput of the UltraFlux DiT through the DeepSpeed ZeRO-3 engine: step time, images/s,
tokens/s and model FLOPs utilisation (MFU).

Two kinds of rows:
- ``dit-stack``: Flux-width blocks (24 heads × 128 = 3072 wide, T5 width 4096, CLIP 768) but only a few of them
  (``--double``/``--single``), at native-4K token counts (4096² → 16,384 image tokens + 512 text tokens). On a
  CPU the width is cut (``--heads``) and the sizes are small, so the row stays runnable.
- ``tiny``: the tiny test/demo config (``ultraflux_model.checkpoint.tiny``) at the tiny bucket sizes.

A step is what the trainer does: noise, DiT forward, x̂₀, SNR-aware Huber wavelet loss, backward, AdamW step
(``deepspeed.initialize`` with torch AdamW, bf16 on CUDA / fp32 on CPU, ZeRO stage 3, one rank).
Model FLOPs are counted analytically (matmuls + attention, forward × 3 for forward+backward; activation
recomputation is not counted, as usual for MFU). MFU is reported against the device's dense spec peak when
it is known (H100/H200 bf16 989 TFLOP/s) and against a measured large-GEMM throughput on any device.

    python -m benchmarks.bench_training                     # CPU: reduced width + tiny
    python -m benchmarks.bench_training --device cuda       # GPU: 4K token counts, full width

Writes ``benchmarks/results/training_<device>.{csv,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
import time

import torch
from ultraflux_model.config import DeepSpeedConfig, LossConfig, StageConfig, TimestepConfig
from ultraflux_model.diffusion.losses import training_loss
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.training.distributed import init_distributed
from ultraflux_model.training.trainer import deepspeed_config, draw_noise_and_t, predict_x0

from benchmarks.report import print_rows, save_rows
from benchmarks.timing import median_seconds, synchronize

SPEC_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def dit_flops(width: int, n_img: int, n_txt: int, double: int, single: int, in_ch: int = 64,
              text_dim: int = 4096) -> float:
    """Forward FLOPs of one sample: every block is 12·d² multiply-adds per token plus attention 4·N²·d."""
    n = n_img + n_txt
    per_block = 2 * 12 * width**2 * n + 4 * n * n * width
    embed = 2 * n_img * in_ch * width + 2 * n_txt * text_dim * width + 2 * n_img * width * in_ch
    return (double + single) * per_block + embed


def measured_gemm_tflops(device: torch.device, dtype: torch.dtype) -> float:
    side = 8192 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * side**3 / seconds / 1e12


def spec_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in SPEC_PEAK_TFLOPS.items() if k in name), None)


def bench_row(label: str, model: UltraFluxTransformer2DModel, size: tuple[int, int], batch: int, n_txt: int,
              device: torch.device, repeats: int, gemm_tflops: float) -> dict:
    import deepspeed

    width, height = size
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    stage = StageConfig(micro_batch=batch, global_batch=batch)
    ds = DeepSpeedConfig(precision="bf16" if bf16 else "fp32")
    model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(ds, stage, 1),
                                      dist_init_required=False)
    cfg = model.config
    h, w = height // 16, width // 16
    gen = torch.Generator().manual_seed(0)
    data = {
        "latents": torch.randn(batch, 16, h, w, generator=gen).to(device),
        "prompt_embeds": torch.randn(batch, n_txt, cfg.joint_attention_dim, generator=gen).to(device),
        "pooled": torch.randn(batch, cfg.pooled_projection_dim, generator=gen).to(device),
    }
    counter = {"step": 0}

    def step() -> None:
        noise, t = draw_noise_and_t(tuple(data["latents"].shape), 0, seed=0, stage_index=0, step=counter["step"],
                                    stage=stage, timesteps=TimestepConfig())
        pred, target = predict_x0(engine, data, noise, t, guidance=3.5 if cfg.guidance_embeds else None, dtype=dtype)
        loss = training_loss(pred, target, t.to(device), cfg=LossConfig(), kernel="auto")
        engine.backward(loss)
        engine.step()
        counter["step"] += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device, warmup=2, repeats=repeats)
    synchronize(device)
    n_img = (h // 2) * (w // 2)
    width_d = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 3 * batch * dit_flops(width_d, n_img, n_txt, cfg.num_layers, cfg.num_single_layers,
                                  text_dim=cfg.joint_attention_dim)
    achieved = flops / seconds / 1e12
    peak = spec_peak(device)
    return {
        "config": label, "device": str(device), "dtype": "bf16" if bf16 else "fp32", "size": f"{width}x{height}",
        "batch": batch, "image_tokens": n_img, "text_tokens": n_txt, "width": width_d,
        "blocks": f"{cfg.num_layers}+{cfg.num_single_layers}", "step_s": seconds, "images_per_s": batch / seconds,
        "tokens_per_s": batch * n_img / seconds, "model_tflops": achieved,
        "mfu_spec": achieved / peak if peak else None, "mfu_measured_gemm": achieved / gemm_tflops,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks in the stack (Flux: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks in the stack (Flux: 38)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads of 128 (default 24 GPU / 2 CPU)")
    parser.add_argument("--sizes", nargs="*", default=None, help="WxH image sizes of the dit-stack rows")
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512 GPU / 64 CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    heads = args.heads or (24 if gpu else 2)
    sizes = args.sizes or (["2048x2048", "4096x4096", "5440x3072"] if gpu else ["512x512", "1024x1024"])
    n_txt = args.text_tokens or (512 if gpu else 64)
    repeats = args.repeats or (5 if gpu else 3)
    init_distributed(DeepSpeedConfig())
    gemm = measured_gemm_tflops(device, torch.bfloat16 if gpu else torch.float32)

    rows = []
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        torch.manual_seed(0)
        model = UltraFluxTransformer2DModel(
            num_layers=args.double, num_single_layers=args.single, num_attention_heads=heads, attention_head_dim=128,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        )
        started = time.perf_counter()
        rows.append(bench_row("dit-stack", model.to(device), (width, height), 1, n_txt, device, repeats, gemm))
        print(f"{size}: {time.perf_counter() - started:.1f}s")
        del model
        if gpu:
            torch.cuda.empty_cache()

    from ultraflux_model.checkpoint.tiny import tiny_transformer

    for size in [(256, 256), (288, 224)]:
        torch.manual_seed(0)
        rows.append(bench_row("tiny", tiny_transformer().to(device), size, 2, 8, device, max(repeats, 5), gemm))

    stem = f"training_{device.type}"
    save_rows(rows, stem)
    print_rows(rows, ["config", "size", "batch", "image_tokens", "width", "blocks", "dtype", "step_s",
                      "images_per_s", "tokens_per_s", "model_tflops", "mfu_spec", "mfu_measured_gemm", "peak_mem_gb"],
               f"training step ({device}, ZeRO-3, measured GEMM {gemm:.2f} TFLOP/s)")


if __name__ == "__main__":
    main()
