"""Peak memory and time of F16 VAE decodes (full / tiled / official) with the real-size UltraFlux VAE config.

Random weights (the cost does not depend on their values). Each (mode, size, repetition) runs in its own
subprocess so that peak memory is that decode's alone: on CUDA ``max_memory_allocated``, on CPU the growth of
the process' peak RSS over its size just before decoding. The modes of one size alternate within each
repetition (full first, then tiled first, ...), so that the ratios against ``full`` compare decodes measured
side by side on a shared machine; the table gives the min and the median over the repetitions and the ratios
of both, ``macs_vs_full`` (multiply-adds counted on the meta device) and ``max_abs_vs_full`` (the largest |mode − full| over the image, from the first repetition). A mode
whose predicted footprint exceeds the available memory is recorded as skipped with the prediction, rather than
taking the machine down.

    python -m benchmarks.bench_vae_decode --sizes 1024 2048 4096 [--reps 3] [--device cuda] [--dtype bf16] [--merge]

Writes ``benchmarks/results/vae_decode.{csv,json}`` and prints a table with ratios against ``full``.
``--merge`` keeps the rows of the previous results that this run did not measure (marked "ok (earlier run)"),
e.g. the 18 GB full decode at 4096² that a shared machine cannot repeat at will.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("full", "tiled", "official")
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=16,
                stride=2)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


def predicted_full_gb(size: int, bytes_per: int = 4) -> float:
    """The full decode's two largest simultaneous tensors: the ×2-upsampled 128-channel head input and its SiLU."""
    return 2 * 128 * size * size * bytes_per / (1 << 30)


def run_one(mode: str, size: int, device: str, dtype: str, save: str | None = None) -> dict:
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
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.shape == (1, 3, size, size)
    if save:
        torch.save(out.cpu(), save)
    return {"mode": mode, "size": size, "device": device, "dtype": dtype, "seconds": round(seconds, 3),
            "peak_extra_gb": round((peak - base) / (1 << 30), 3), "status": "ok"}


@functools.cache  # one count per (mode, size): every row's ratio reads the full decode's again
def counted_macs(mode: str, size: int) -> int:
    """Multiply-adds of one decode at ``size`` (``FlopCounterMode`` over meta tensors: counted, not timed)."""
    from torch.utils.flop_counter import FlopCounterMode
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    with torch.device("meta"):
        vae = UltraFluxAutoencoderKL(**REAL_VAE).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(torch.empty(1, 16, size // 16, size // 16, device="meta"), mode=mode)
    return counter.get_total_flops() // 2


def _child(mode: str, size: int, args: argparse.Namespace, save: Path | None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_vae_decode", "--device", args.device, "--dtype", args.dtype,
         "--child", mode, str(size), *(["--save", str(save)] if save else [])],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(size: int, modes: list[str], args: argparse.Namespace) -> list[dict]:
    """``args.reps`` interleaved repetitions of every mode at ``size``: one row per mode with min/median seconds,
    the largest peak and the largest |mode − full| of the first repetition's images."""
    need = predicted_full_gb(size, 2 if args.dtype != "fp32" else 4)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    skipped: dict[str, str] = {}
    if "full" in modes and args.device == "cpu" and need > 0.8 * _available_gb():
        skipped["full"] = f"skipped: needs >{need:.1f} GB, {_available_gb():.1f} GB available"
    with tempfile.TemporaryDirectory() as tmp:
        images = {m: Path(tmp) / f"{m}.pt" for m in modes}
        for rep in range(args.reps):
            order = [m for m in modes if m not in skipped]
            for mode in order if rep % 2 == 0 else order[::-1]:
                run = _child(mode, size, args, images[mode] if rep == 0 else None)
                print({"rep": rep, "mode": mode, "size": size, **run}, flush=True)
                if not run["status"].startswith("ok"):
                    skipped[mode] = run["status"]
                runs[mode].append(run)
        full = torch.load(images["full"]) if images.get("full") and images["full"].is_file() else None
        rows = []
        for mode in modes:
            base = {"mode": mode, "size": size, "device": args.device, "dtype": args.dtype}
            seconds = [r["seconds"] for r in runs[mode] if r["status"] == "ok"]
            if mode in skipped or not seconds:
                rows.append({**base, "reps": 0, "seconds": None, "seconds_median": None, "peak_extra_gb": None,
                             "max_abs_vs_full": None, "status": skipped.get(mode, "no runs")})
                continue
            diff = None
            if full is not None and images[mode].is_file():
                diff = float((torch.load(images[mode]) - full).abs().max())
            rows.append({**base, "reps": len(seconds), "seconds": min(seconds),
                         "seconds_median": round(statistics.median(seconds), 3),
                         "peak_extra_gb": max(r["peak_extra_gb"] for r in runs[mode] if r["status"] == "ok"),
                         "max_abs_vs_full": diff, "status": "ok"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096],
                        help="none with --merge: only recompute the ratios and the table of the earlier results")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions per (size, mode)")
    parser.add_argument("--merge", action="store_true", help="keep earlier rows this run does not re-measure")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.device, args.dtype, args.save)))
        return

    rows = [row for size in args.sizes for row in measure(size, args.modes, args)]
    if args.merge and (RESULTS / "vae_decode.json").is_file():
        key = lambda r: (r["mode"], r["size"], r["device"], r["dtype"])  # noqa: E731
        measured = {key(r) for r in rows if r["status"].startswith("ok")}
        def earlier_row(r: dict) -> dict:
            keep = not rows or not r["status"].startswith("ok") or "earlier run" in r["status"]
            r = {k: v for k, v in r.items() if k != "time_vs_full"}  # the one-repetition format's ratio column
            return {**r, "status": r["status"] if keep else "ok (earlier run)"}

        results = json.loads((RESULTS / "vae_decode.json").read_text())
        earlier = [earlier_row(r) for r in results if key(r) not in measured]
        kept = {key(r) for r in earlier}
        rows = sorted(earlier + [r for r in rows if key(r) not in kept or r["status"].startswith("ok")],
                      key=lambda r: (r["size"], MODES.index(r["mode"])))
    for row in rows:
        refs = (r for r in rows if r["size"] == row["size"] and r["mode"] == "full" and r["status"].startswith("ok"))
        ref = next(refs, None)
        ok = ref is not None and row["status"].startswith("ok")
        row["time_vs_full_min"] = round(row["seconds"] / ref["seconds"], 3) if ok else None
        medians = ok and row.get("seconds_median") and ref.get("seconds_median")
        row["time_vs_full_median"] = round(row["seconds_median"] / ref["seconds_median"], 3) if medians else None
        memory = ok and ref["peak_extra_gb"]
        row["memory_vs_full"] = round(row["peak_extra_gb"] / ref["peak_extra_gb"], 3) if memory else None
        # what the decode computes, beside what it costs: a time ratio above the multiply-add ratio is overhead
        row["macs_vs_full"] = round(counted_macs(row["mode"], row["size"]) / counted_macs("full", row["size"]), 3)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vae_decode.json").write_text(json.dumps(rows, indent=2) + "\n")
    with (RESULTS / "vae_decode.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) and abs(v) < 1e-3 else f"{v}"  # noqa: E731
    header = (f"{'size':>6} {'mode':>9} {'reps':>4} {'s min':>9} {'s median':>9} {'peak GB':>8} {'t/full min':>10} "
              f"{'t/full med':>10} {'mem/full':>8} {'MAC/full':>8} {'max|d|':>8}  status")
    print(header)
    for r in rows:
        print(f"{r['size']:>6} {r['mode']:>9} {fmt(r.get('reps')):>4} {fmt(r['seconds']):>9} "
              f"{fmt(r.get('seconds_median')):>9} "
              f"{fmt(r['peak_extra_gb']):>8} {fmt(r['time_vs_full_min']):>10} {fmt(r['time_vs_full_median']):>10} "
              f"{fmt(r['memory_vs_full']):>8} {fmt(r['macs_vs_full']):>8} {fmt(r.get('max_abs_vs_full')):>8}  {r['status']}")

if __name__ == "__main__":
    main()
