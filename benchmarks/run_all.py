"""Run every benchmark in turn (each writes its own CSV/JSON under benchmarks/results/ and prints its table).

    python -m benchmarks.run_all            # full sizes (meant for a GPU machine; hours on a 2-core CPU)
    python -m benchmarks.run_all --quick    # small sizes: a smoke run of every benchmark on a CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys

FULL: dict[str, list[str]] = {
    "bench_kernels": [],
    "bench_vae_decode": [],
    "memory_table": [],  # reads bench_vae_decode's results
    "bench_scores": [],
    "bench_curation": [],
    "bench_eval": [],
    "bench_training": [],
    "bench_loss_ablation": [],
    "bench_partitioned_load": ["--layers", "2", "--single-layers", "2"],
}
QUICK: dict[str, list[str]] = {
    "bench_kernels": ["--quick", "--repeats", "3", "--warmup", "1", "--threads", "1"],
    "bench_vae_decode": ["--sizes", "256", "512"],
    "bench_scores": ["--sizes", "1920x1080", "--repeats", "1"],
    "bench_curation": ["--images", "2", "--side", "1024"],
    "bench_eval": ["--sizes", "1024x1024", "--repeats", "1"],
    "bench_training": ["--repeats", "2"],
    "bench_loss_ablation": ["--steps", "20", "--seeds", "0"],
    "bench_partitioned_load": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), help="run only these")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    failed = []
    for name, extra in plan.items():
        if args.only and name not in args.only:
            continue
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra]).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
