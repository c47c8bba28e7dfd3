"""Peak memory and time of F16 VAE decodes (full / tiled / official) with the real-size UltraFlux VAE config.

Random weights (the cost does not depend on their values). Each (mode, size) runs in its own subprocess so
that peak memory is that decode's alone: on CUDA ``max_memory_allocated``, on CPU the growth of the
process' peak RSS over its size just before decoding. A mode whose predicted footprint exceeds the
available memory is recorded as skipped with the prediction, rather than taking the machine down.

    python -m benchmarks.bench_vae_decode --sizes 1024 2048 4096 [--device cuda] [--dtype bf16] [--merge]

Writes ``benchmarks/results/vae_decode.{csv,json}`` and prints a table with ratios against ``full``.
``--merge`` keeps the rows of the previous results that this run did not measure (marked "ok (earlier run)"),
e.g. the 18 GB full decode at 4096² that a shared machine cannot repeat at will.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("full", "tiled", "official")
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=16, stride=2)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


def predicted_full_gb(size: int, bytes_per: int = 4) -> float:
    """The full decode's two largest simultaneous tensors: the ×2-upsampled 128-channel head input and its SiLU."""
    return 2 * 128 * size * size * bytes_per / (1 << 30)


def run_one(mode: str, size: int, device: str, dtype: str) -> dict:
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    vae = UltraFluxAutoencoderKL(**REAL_VAE).to(device, torch_dtype).eval()
    z = torch.randn(1, 16, size // 16, size // 16, device=device, dtype=torch_dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z, mode=mode).sample
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.shape == (1, 3, size, size)
    return {"mode": mode, "size": size, "device": device, "dtype": dtype, "seconds": round(seconds, 3),
            "peak_extra_gb": round((peak - base) / (1 << 30), 3), "status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--merge", action="store_true", help="keep earlier rows this run does not re-measure")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.device, args.dtype)))
        return

    rows = []
    for size in args.sizes:
        for mode in args.modes:
            need = predicted_full_gb(size, 2 if args.dtype != "fp32" else 4)
            if mode == "full" and args.device == "cpu" and need > 0.8 * _available_gb():
                rows.append({"mode": mode, "size": size, "device": args.device, "dtype": args.dtype, "seconds": None,
                             "peak_extra_gb": None, "status": f"skipped: needs >{need:.1f} GB, {_available_gb():.1f} GB available"})
                continue
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_vae_decode", "--device", args.device, "--dtype", args.dtype,
                 "--child", mode, str(size)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                rows.append({"mode": mode, "size": size, "device": args.device, "dtype": args.dtype, "seconds": None,
                             "peak_extra_gb": None, "status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)

    if args.merge and (RESULTS / "vae_decode.json").is_file():
        key = lambda r: (r["mode"], r["size"], r["device"], r["dtype"])  # noqa: E731
        measured = {key(r) for r in rows}
        earlier = [
            {**r, "status": "ok (earlier run)" if r["status"].startswith("ok") else r["status"]}
            for r in json.loads((RESULTS / "vae_decode.json").read_text())
            if key(r) not in measured
        ]
        rows = sorted(earlier + rows, key=lambda r: (r["size"], MODES.index(r["mode"])))
    for row in rows:
        ref = next((r for r in rows if r["size"] == row["size"] and r["mode"] == "full" and r["status"].startswith("ok")), None)
        ok = ref is not None and row["status"].startswith("ok")
        row["time_vs_full"] = round(row["seconds"] / ref["seconds"], 3) if ok else None
        row["memory_vs_full"] = round(row["peak_extra_gb"] / ref["peak_extra_gb"], 3) if ok and ref["peak_extra_gb"] else None

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vae_decode.json").write_text(json.dumps(rows, indent=2) + "\n")
    with (RESULTS / "vae_decode.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = f"{'size':>6} {'mode':>9} {'seconds':>9} {'peak GB':>9} {'t/full':>7} {'mem/full':>8}  status"
    print(header)
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
        print(f"{r['size']:>6} {r['mode']:>9} {fmt(r['seconds']):>9} {fmt(r['peak_extra_gb']):>9} "
              f"{fmt(r['time_vs_full']):>7} {fmt(r['memory_vs_full']):>8}  {r['status']}")


if __name__ == "__main__":
    main()
