"""50-step generation time at 1024² and 4096², extrapolated per block to the full 57-block UltraFlux model.

The production sampling loop (``inference.pipeline.sample_latents``: FlowMatch Euler, static shift, guidance
embedding) runs a FLUX.1-dev-width transformer with a few blocks (random bf16 weights) and the real-size
F16 VAE; text embeddings are random [1, 512, 4096] / [1, 768] (text encoding runs once per prompt and is not
timed). A step's time is fitted as ``a + b·double + c·single`` from three layouts, (1, 1), (2, 1), (1, 2),
and extrapolated to FLUX.1-dev's (19, 38); the tiled VAE decode is measured at full size. Peak memory is
extrapolated by swapping the reduced model's weights for the full model's (activations at inference do not
grow with depth).

    python -m benchmarks.bench_generate [--sizes 1024 4096] [--steps 50] [--timed-steps 3] [--device cuda]

Writes ``benchmarks/results/generate_<device>.{csv,json}`` (or ``--out``); without CUDA on ``--device cuda``
it writes a ``skipped`` row and exits 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_block import real_width_model
from benchmarks.report import RESULTS, print_rows, save_rows
from benchmarks.timing import synchronize

LAYOUTS = ((1, 1), (2, 1), (1, 2))
FULL = (19, 38)


def make_pipe(double: int, single: int, device: torch.device):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from ultraflux_model.inference.pipeline import UltraFluxPipeline
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    torch.manual_seed(0)
    vae = UltraFluxAutoencoderKL().to(device, torch.bfloat16).eval()  # the real F16 config (class defaults)
    return UltraFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=real_width_model(device, torch.bfloat16, double, single).eval(),
    )


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def step_seconds(pipe, size: int, steps: int, device: torch.device) -> float:
    """Seconds per sampling step at ``size``² (one untimed warm-up step first)."""
    from ultraflux_model.inference.pipeline import sample_latents

    gen = torch.Generator(device).manual_seed(0)
    embeds = torch.randn(1, 512, 4096, generator=gen, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, generator=gen, device=device, dtype=torch.bfloat16)

    def run(n: int):
        return sample_latents(pipe, embeds, pooled, size, size, steps=n, guidance=4.0, shift=3.0, seed=0,
                              progress=False)

    run(1)
    seconds, _ = timed(lambda: run(steps), device)
    return seconds / steps


def fit_step(times: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """(a, b, c) with t = a + b·double + c·single through the three layouts (exact for these three)."""
    t11, t21, t12 = times[(1, 1)], times[(2, 1)], times[(1, 2)]
    b, c = t21 - t11, t12 - t11
    return t11 - b - c, b, c


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=50, help="steps of the extrapolated generation")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps actually timed per layout and size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    stem = f"generate_{device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        save_rows([{"size": 0, "layout": "-", "step_s": None, "status": "skipped: no CUDA device"}], stem, args.out)
        print("bench_generate: skipped (no CUDA device)")
        return []
    cuda = device.type == "cuda"
    rows, times, peaks = [], {size: {} for size in args.sizes}, {size: {} for size in args.sizes}
    weights = {}
    for layout in LAYOUTS:
        pipe = make_pipe(*layout, device)
        weights[layout] = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        for size in args.sizes:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times[size][layout] = step_seconds(pipe, size, args.timed_steps, device)
            peaks[size][layout] = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
            rows.append({"size": size, "layout": f"{layout[0]}+{layout[1]}", "step_s": times[size][layout],
                         "generate_s": None, "decode_s": None, "total_s": None, "peak_gb": peaks[size][layout],
                         "status": "measured"})
        if layout != LAYOUTS[0]:
            del pipe
            continue
        decode = {}
        for size in args.sizes:  # the decode does not depend on the transformer: measure it once
            z = torch.randn(1, 16, size // 16, size // 16, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                decode[size], _ = timed(lambda z=z: pipe.vae.decode(z, mode="tiled").sample, device)
        del pipe
    full_weights = 2 * 11_901_408_320  # FLUX.1-dev transformer in bf16
    for size in args.sizes:
        a, b, c = fit_step(times[size])
        step = a + b * FULL[0] + c * FULL[1]
        peak = peaks[size][(1, 1)]
        rows.append({"size": size, "layout": f"{FULL[0]}+{FULL[1]} (extrapolated)", "step_s": step,
                     "generate_s": args.steps * step, "decode_s": decode[size],
                     "total_s": args.steps * step + decode[size],
                     "peak_gb": None if peak is None else peak - weights[(1, 1)] / 1e9 + full_weights / 1e9,
                     "status": f"a={a:.4g}s b={b:.4g}s/double c={c:.4g}s/single"})
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    paths = save_rows(rows, stem, args.out)
    print_rows(rows, ("size", "layout", "step_s", "generate_s", "decode_s", "total_s", "peak_gb", "status"),
               title=f"{args.steps}-step generation on {name}, bf16")
    print(f"wrote {paths[0]} and {paths[1]}")
    return rows


if __name__ == "__main__":
    main()
