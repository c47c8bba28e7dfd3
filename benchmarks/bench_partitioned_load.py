"""Host memory of building + loading the transformer on each of N ranks: ZeRO-3 partitioned and streamed
(``training/partitioned.py``, parameters in ``--precision``) against the whole-model fp32 ``from_pretrained`` each
rank did before, measured in the same run on the same checkpoint.

The checkpoint is a real-width (FLUX.1-dev widths) transformer with few blocks, written by ``ultraflux init-tiny
--width-preset flux-dev`` unless ``--checkpoint`` names one. Each rank resets its RSS high-water mark right before
construction and reports the growth (``training/host_memory.py``); the table shows the largest rank.

    python -m benchmarks.bench_partitioned_load                           # 2 gloo ranks, 1 + 1 blocks, bf16 file
    python -m benchmarks.bench_partitioned_load --layers 2 --single-layers 2 --ranks 2

Writes ``benchmarks/results/partitioned_load.{csv,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import print_rows, save_rows

MODES = ("from_pretrained", "partitioned")
LAUNCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def rank_worker(mode: str, transformer: Path, out: Path, precision: str) -> None:
    """One rank (under torchrun): build + load in ``mode``, write {peak growth, numel, seconds} as JSON."""
    import torch
    from ultraflux_model.config import DeepSpeedConfig, StageConfig
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
    from ultraflux_model.training.distributed import init_distributed
    from ultraflux_model.training.host_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from ultraflux_model.training.partitioned import build_partitioned
    from ultraflux_model.training.trainer import deepspeed_config

    ds = DeepSpeedConfig(precision=precision, backend="gloo")
    dist = init_distributed(ds)
    config = deepspeed_config(ds, StageConfig(micro_batch=1, global_batch=dist.world_size), dist.world_size)
    exact = reset_peak_rss()
    baseline, started = rss_bytes(), time.perf_counter()
    if mode == "partitioned":
        model = build_partitioned(UltraFluxTransformer2DModel, transformer, config)
        numel = sum(p.ds_numel for p in model.parameters())
    else:  # what the trainer did before: the whole model in fp32 on every rank, for DeepSpeed to partition
        model = UltraFluxTransformer2DModel.from_pretrained(transformer, torch_dtype=torch.float32)
        numel = sum(p.numel() for p in model.parameters())
        # An unconverted tensor may still be a lazy view of the file's memory map; count it as resident, as
        # DeepSpeed's partitioning (which reads every parameter) would make it.
        sum(float(p.detach().float().sum()) for p in model.parameters())
    seconds = time.perf_counter() - started
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps({
        "rank": dist.rank, "world_size": dist.world_size, "numel": numel, "seconds": seconds,
        "growth": peak_rss_bytes() - baseline, "exact_peak": exact,
    }))


def run_mode(mode: str, transformer: Path, ranks: int, precision: str, out: Path) -> list[dict]:
    from ultraflux_model.training.distributed import free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "benchmarks.bench_partitioned_load", "--worker",
           mode, "--checkpoint", str(transformer.parent), "--out", str(out), "--precision", precision]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint with transformer/ (default: write one)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--single-layers", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="parameter dtype on the ranks")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank_worker(args.worker, args.checkpoint / "transformer", args.out, args.precision)
        return
    with tempfile.TemporaryDirectory(prefix="bench-partitioned-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch
            from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(tmp) / "ckpt", width_preset="flux-dev", layers=args.layers,
                                               single_layers=args.single_layers, dtype=torch.bfloat16)
        results = {mode: run_mode(mode, checkpoint / "transformer", args.ranks, args.precision, Path(tmp))
                   for mode in MODES}
    reference = max(r["growth"] for r in results["from_pretrained"])
    rows = []
    for mode, ranks in results.items():
        worst = max(ranks, key=lambda r: r["growth"])
        fp32 = worst["numel"] * 4
        rows.append({
            "mode": mode, "ranks": args.ranks, "precision": args.precision, "params_m": worst["numel"] / 1e6,
            "fp32_model_mib": fp32 / 2**20, "peak_growth_mib": worst["growth"] / 2**20,
            "growth_over_fp32_model": worst["growth"] / fp32, "growth_vs_from_pretrained": worst["growth"] / reference,
            "seconds": max(r["seconds"] for r in ranks), "exact_peak": all(r["exact_peak"] for r in ranks),
        })
    save_rows(rows, "partitioned_load")
    print_rows(rows, ["mode", "ranks", "precision", "params_m", "fp32_model_mib", "peak_growth_mib",
                      "growth_over_fp32_model", "growth_vs_from_pretrained", "seconds"],
               "host memory per rank: build + load the transformer (largest rank)")


if __name__ == "__main__":
    main()
