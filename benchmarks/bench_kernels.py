"""Fused Triton kernels vs eager and torch.compile: RoPE application and the SNR-aware Huber wavelet loss.

For each op, shape, implementation and pass (forward, backward, forward+backward) it reports the median
time, the achieved bandwidth (the bytes the op must move ÷ time), that bandwidth as a fraction of a
device copy measured in the same run, and the speed-up over eager. Implementations: ``eager`` (diffusers'
``apply_rotary_emb``; our reference loss), ``compile`` (``torch.compile`` of the same function) and
``triton`` (our kernels; CUDA only: the CPU interpreter is a correctness tool, not a speed one).

Bytes that must move (one read of each input, one write of each output, fp32 cos/sin tables):
    RoPE  forward = backward = 2·|x| + 8·S·D                     (x and the gradient have x's dtype)
    loss  forward 2·|x| (pred, target), backward 3·|x| (+ grad of pred)

Goals on an H200 (checked in the ``goal`` column): RoPE ≥ 80 % of copy bandwidth and ≥ 8× eager
(forward and backward); loss forward+backward ≥ 5× eager.

    python -m benchmarks.bench_kernels                    # full shapes, CUDA when present
    python -m benchmarks.bench_kernels --device cpu --quick --threads 1

Writes ``benchmarks/results/kernels_<device>[_quick].{csv,json}``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb
from ultraflux_model.config import LossConfig
from ultraflux_model.diffusion.losses import snr_huber_wavelet_loss

from benchmarks.report import print_rows, save_rows
from benchmarks.timing import copy_bandwidth, median_seconds

ROPE_SHAPES = ((1, 24, 16896, 128), (2, 24, 4608, 128))  # [B, H, S, D]: 4096² + 512 text tokens; 2048² batch 2
LOSS_SHAPES = ((1, 16, 256, 256), (8, 16, 128, 128))  # [B, C, H, W] latents of 4096² and 2048²
QUICK_ROPE_SHAPES = ((1, 24, 1024, 128), (2, 24, 512, 128))
QUICK_LOSS_SHAPES = ((1, 16, 64, 64), (8, 16, 32, 32))
IMPLS = ("eager", "compile", "triton")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Workload:
    """One op at one shape: differentiable input, extra inputs, the upstream gradient, bytes per pass."""

    op: str
    shape: tuple[int, ...]
    x: torch.Tensor
    args: tuple[torch.Tensor, ...]
    grad_out: torch.Tensor
    bytes_moved: dict[str, int]
    functions: dict[str, Callable[..., torch.Tensor]]


def rope_workload(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Workload:
    batch, heads, seq, dim = shape
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(seq, dim // 2, generator=gen, device=device) * 100
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)

    def eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)

    functions = {"eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if device.type == "cuda":
        from ultraflux_model.kernels.rope import apply_rope

        functions["triton"] = apply_rope
    one_way = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
    return Workload(
        "rope", shape, x, (cos, sin), torch.randn_like(x), {"fwd": one_way, "bwd": one_way, "fwd+bwd": 2 * one_way},
        functions,
    )


def loss_workload(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Workload:
    gen = torch.Generator(device).manual_seed(0)
    pred = torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    t = torch.rand(shape[0], generator=gen, device=device)
    params = LossConfig().model_dump()  # the loss functions take every hyper-parameter
    reference = functools.partial(snr_huber_wavelet_loss, **params)
    functions = {"eager": reference, "compile": torch.compile(reference, dynamic=False)}
    if device.type == "cuda":
        from ultraflux_model.kernels.wavelet_loss import snr_huber_wavelet_loss as fused

        functions["triton"] = functools.partial(fused, **params)
    size = pred.numel() * pred.element_size()
    grad_out = torch.ones((), device=device)
    bytes_moved = {"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size}
    return Workload("loss", shape, pred, (target, t), grad_out, bytes_moved, functions)


def pass_fn(work: Workload, fn: Callable[..., torch.Tensor], which: str) -> Callable[[], object]:
    """A no-argument callable that runs one pass of ``fn`` on the workload."""
    if which == "fwd":
        return lambda: fn(work.x, *work.args)
    if which == "bwd":
        out = fn(work.x, *work.args)  # graph kept alive: only the backward is timed
        return lambda: torch.autograd.grad(out, [work.x], work.grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(work.x, *work.args), [work.x], work.grad_out)


def goal(op: str, impl: str, which: str, frac_of_copy: float | None, speedup: float | None) -> str | None:
    """The issue's H200 goals, where one applies to this row."""
    if impl != "triton" or frac_of_copy is None or speedup is None:
        return None
    if op == "rope" and which in ("fwd", "bwd"):
        met = frac_of_copy >= 0.8 and speedup >= 8.0
        return f"{'met' if met else 'MISSED'} (≥0.8 copy, ≥8x)"
    if op == "loss" and which == "fwd+bwd":
        return f"{'met' if speedup >= 5.0 else 'MISSED'} (≥5x)"
    return None


def measure(
    work: Workload, impls: Sequence[str], device: torch.device, dtype_name: str, warmup: int, repeats: int
) -> list[dict]:
    copy_bps = copy_bandwidth(work.x.numel() * work.x.element_size(), device, warmup=warmup, repeats=repeats)
    rows = []
    for impl in impls:
        fn = work.functions.get(impl)
        for which in PASSES:
            row = {
                "op": work.op, "shape": "x".join(map(str, work.shape)), "dtype": dtype_name, "device": device.type,
                "impl": impl, "pass": which, "median_ms": None, "bytes_moved": work.bytes_moved[which],
                "gbps": None, "copy_gbps": round(copy_bps / 1e9, 2), "frac_of_copy": None, "speedup_vs_eager": None,
                "goal": None, "status": "ok",
            }  # fmt: skip
            if fn is None:
                row["status"] = "skipped: Triton kernels are timed on CUDA only"
                rows.append(row)
                continue
            try:
                seconds = median_seconds(pass_fn(work, fn, which), device, warmup=warmup, repeats=repeats)
            except Exception as err:  # a failing implementation is a result to report, not a crash
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                rows.append(row)
                continue
            row["median_ms"] = seconds * 1e3
            row["gbps"] = work.bytes_moved[which] / seconds / 1e9
            row["frac_of_copy"] = row["gbps"] * 1e9 / copy_bps
            rows.append(row)
    for row in rows:
        eager = next(r for r in rows if r["impl"] == "eager" and r["pass"] == row["pass"])
        if row["median_ms"] and eager["median_ms"]:
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
        row["goal"] = goal(row["op"], row["impl"], row["pass"], row["frac_of_copy"], row["speedup_vs_eager"])
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--ops", nargs="+", default=["rope", "loss"], choices=["rope", "loss"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="CPU threads (1 gives stable numbers on a shared machine)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    builders = {
        "rope": (rope_workload, QUICK_ROPE_SHAPES if args.quick else ROPE_SHAPES),
        "loss": (loss_workload, QUICK_LOSS_SHAPES if args.quick else LOSS_SHAPES),
    }
    impls = ["eager", *[i for i in args.impls if i != "eager"]]  # eager is every ratio's denominator
    rows: list[dict] = []
    for op in args.ops:
        build, shapes = builders[op]
        for shape in shapes:
            rows += measure(build(shape, dtype, device), impls, device, args.dtype, args.warmup, args.repeats)
            torch._dynamo.reset()  # drop compiled graphs (and the tensors they hold) between shapes

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    stem = f"kernels_{device.type}{'_quick' if args.quick else ''}"
    csv_path, json_path = save_rows(rows, stem)
    columns = ("op", "shape", "impl", "pass", "median_ms", "gbps", "copy_gbps", "frac_of_copy", "speedup_vs_eager")
    columns += ("goal", "status")
    print_rows(rows, columns, title=f"Kernels on {name}, {args.dtype}")
    print(f"wrote {csv_path} and {json_path}")
    return rows


if __name__ == "__main__":
    main()
