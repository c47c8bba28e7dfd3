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

Two more modes measure the accelerators of ``generate.accel`` (docs/inference.md "Accelerators"):

    python -m benchmarks.bench_generate --mode cache [--widths tiny real] [--size 256] [--steps 20]
    python -m benchmarks.bench_generate --mode accel --device cuda [--sizes 1024 4096]

``cache`` (CPU): per cache setting, the transformer-block and attention evaluations per image (forward hooks
inside the blocks) and the PSNR of the decoded image against the uncached one of the same run, at tiny widths
and at FLUX.1-dev widths (1 double + 2 single blocks, random weights); ratios against the uncached reference.
Writes ``generate_cache.{csv,json}``. ``accel`` (GPU): seconds per step for every cache × compile × quantize
combination at each size (real widths, 1+2 blocks, bf16; compiled variants warmed up first), ratios against
none/none/none at the same size; combinations the device refuses (fp8 below compute capability 8.9) are rows
with the refusal. Writes ``generate_accel_<device>.{csv,json}``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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


# The cache settings the cache table compares (the first is the reference); thresholds around diffusers' defaults.
CACHE_SETTINGS = {
    "none": {},
    "first_block t=0.05": {"cache": "first_block", "cache_threshold": 0.05},
    "first_block t=0.2": {"cache": "first_block", "cache_threshold": 0.2},
    "first_block t=0.5": {"cache": "first_block", "cache_threshold": 0.5},
    "taylorseer attention i=5": {"cache": "taylorseer"},
    "taylorseer output i=5": {"cache": "taylorseer", "taylorseer_predict": "output"},
    "taylorseer output i=3 o=2": {"cache": "taylorseer", "taylorseer_predict": "output", "taylorseer_interval": 3,
                                  "taylorseer_order": 2},
}
WIDTHS = {"tiny": "tiny (2 heads x 16, 1+1 blocks)", "real": "FLUX.1-dev (24 heads x 128, 1+2 blocks)"}


def cache_pipe(width: str, device: torch.device):
    """fp32 pipeline without text encoders: tiny widths (tiny VAE) or FLUX.1-dev widths, 1+2 blocks (real VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from ultraflux_model.checkpoint.tiny import tiny_transformer, tiny_vae
    from ultraflux_model.inference.pipeline import UltraFluxPipeline
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    torch.manual_seed(0)
    if width == "tiny":
        transformer, vae = tiny_transformer(), tiny_vae()
    else:
        transformer, vae = real_width_model(device, torch.float32, 1, 2), UltraFluxAutoencoderKL()
    return UltraFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), vae=vae.to(device).eval(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer.to(device).eval(),
    )


def cache_main(args: argparse.Namespace) -> list[dict]:
    """Block evaluations saved and PSNR against the uncached image, per cache setting and width."""
    from ultraflux_eval.metrics.fidelity import psnr
    from ultraflux_model.config import AccelConfig
    from ultraflux_model.inference.accel import count_evaluations, set_cache
    from ultraflux_model.inference.pipeline import decode_to_pil, sample_latents

    device = torch.device("cpu")
    rows = []
    for width in args.widths:
        pipe = cache_pipe(width, device)
        counts = count_evaluations(pipe.transformer)
        config = pipe.transformer.config
        gen = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, args.text_tokens, config.joint_attention_dim, generator=gen)
        pooled = torch.randn(1, config.pooled_projection_dim, generator=gen)
        reference = None
        for name, settings in CACHE_SETTINGS.items():
            set_cache(pipe.transformer, AccelConfig(**settings))
            counts.update(blocks=0, attention=0)
            sample = functools.partial(sample_latents, pipe, embeds, pooled, args.size, args.size, steps=args.steps,
                                       guidance=4.0, shift=3.0, seed=0, progress=False)  # fmt: skip
            seconds, z = timed(sample, device)
            image = decode_to_pil(pipe, z, "tiled")
            reference = reference or {"image": image, "seconds": seconds, **counts}
            rows.append({
                "width": width, "cache": name, "size": args.size, "steps": args.steps,
                "block_evals": counts["blocks"], "attention_evals": counts["attention"],
                "block_ratio": counts["blocks"] / reference["blocks"],
                "attention_ratio": counts["attention"] / reference["attention"],
                "psnr_db": psnr(image, reference["image"]), "denoise_s": seconds,
                "time_ratio": seconds / reference["seconds"],
            })
    paths = save_rows(rows, "generate_cache", args.out)
    print_rows(rows, ("width", "cache", "block_evals", "block_ratio", "attention_evals", "attention_ratio", "psnr_db",
                      "denoise_s", "time_ratio"),
               title=f"cache hooks on CPU: {args.size}² image, {args.steps} steps, fp32, random weights "
                     f"(ratios and PSNR against 'none' of the same run)")  # fmt: skip
    print(f"wrote {paths[0]} and {paths[1]}")
    return rows


def accel_main(args: argparse.Namespace) -> list[dict]:
    """Seconds per step for every cache × compile × quantize combination at each size (a fresh model per combination:
    quantization and compilation change it in place)."""
    from ultraflux_core.errors import UltraFluxError
    from ultraflux_model.config import AccelConfig
    from ultraflux_model.inference.accel import apply_load_time, check_accel, set_cache

    device = torch.device(args.device)
    stem = f"generate_accel_{device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        save_rows([{"size": 0, "combination": "-", "step_s": None, "status": "skipped: no CUDA device"}], stem,
                  args.out)  # fmt: skip
        print("bench_generate --mode accel: skipped (no CUDA device)")
        return []
    rows, reference = [], {}
    for cache, compile_, quantize in itertools.product(("none", "first_block", "taylorseer"), ("none", "regional"),
                                                       ("none", "fp8")):  # fmt: skip
        accel = AccelConfig(cache=cache, compile=compile_, quantize=quantize)
        label = f"{cache}/{compile_}/{quantize}"
        try:
            check_accel(accel, device)
        except UltraFluxError as err:
            rows += [{"size": size, "combination": label, "step_s": None, "ratio": None, "status": f"refused: {err}"}
                     for size in args.sizes]  # fmt: skip
            continue
        pipe = make_pipe(1, 2, device)  # bf16, as step_seconds' text embeddings
        try:
            apply_load_time(pipe.transformer, accel)
            set_cache(pipe.transformer, accel)
        except Exception as err:  # noqa: BLE001 - e.g. a torchao build that does not fit this torch: a row
            rows += [{"size": size, "combination": label, "step_s": None, "ratio": None,
                      "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                     for size in args.sizes]  # fmt: skip
            continue
        for size in args.sizes:
            try:
                step = step_seconds(pipe, size, args.timed_steps, device)  # includes one untimed warm-up step
                status = "measured"
            except Exception as err:  # noqa: BLE001 - a combination that fails is a row, not the end of the grid
                step, status = None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            if label == "none/none/none":
                reference[size] = step
            ratio = step / reference[size] if step and reference.get(size) else None
            rows.append({"size": size, "combination": label, "step_s": step, "ratio": ratio, "status": status})
        pipe = None  # free this combination's weights before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    paths = save_rows(rows, stem, args.out)
    print_rows(rows, ("size", "combination", "step_s", "ratio", "status"),
               title=f"seconds per step (cache/compile/quantize), FLUX.1-dev widths 1+2 blocks, {name}; "
                     f"ratio against none/none/none")  # fmt: skip
    print(f"wrote {paths[0]} and {paths[1]}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="timing", choices=["timing", "cache", "accel"],
                        help="timing: the 57-block extrapolation; cache: block evaluations and PSNR per cache setting "
                        "(CPU); accel: seconds per step for every accelerator combination")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=50, help="steps of the extrapolated generation (cache: sampled)")
    parser.add_argument("--timed-steps", type=int, default=3, help="steps actually timed per layout and size")
    parser.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS), help="cache mode")
    parser.add_argument("--size", type=int, default=256, help="cache mode: square image side")
    parser.add_argument("--text-tokens", type=int, default=64, help="cache mode: text tokens of the random prompt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.mode == "cache":
        return cache_main(args)
    if args.mode == "accel":
        return accel_main(args)
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
