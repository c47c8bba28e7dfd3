"""Partitioned construction + streamed loading of a real-width transformer on two gloo ranks (DeepSpeed ZeRO-3).

The checkpoint has FLUX.1-dev's widths (3072 hidden = 24 heads × 128, joint 4096, pooled 768) with one double-
and one single-stream block (545 M parameters, 2.0 GiB in fp32), written by ``ultraflux init-tiny --width-preset
flux-dev`` in bf16 as FLUX.1-dev ships, sharded with an index. Each rank measures its own peak resident memory
over construction + load (Linux ``VmHWM``, reset with ``/proc/self/clear_refs`` right before construction, so
the pre-load baseline is excluded exactly) and then checks its gathered parameters against ``safetensors``' own
reader of the same files.

Run by pytest (the test at the bottom launches this file under torchrun) and by torchrun (``__main__``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve()


def rank_main(checkpoint: Path, out: Path) -> None:
    """One rank: build + load partitioned, record the memory high-water mark, then verify the weights."""
    import deepspeed
    import torch
    from safetensors import safe_open
    from ultraflux_model.config import DeepSpeedConfig, StageConfig
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
    from ultraflux_model.training.distributed import init_distributed
    from ultraflux_model.training.host_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from ultraflux_model.training.partitioned import build_partitioned, checkpoint_index
    from ultraflux_model.training.trainer import deepspeed_config

    ds = DeepSpeedConfig(precision="bf16", backend="gloo")
    dist = init_distributed(ds)
    config = deepspeed_config(ds, StageConfig(micro_batch=1, global_batch=dist.world_size), dist.world_size)
    transformer = checkpoint / "transformer"

    assert reset_peak_rss()  # the high-water mark restarts at the current RSS: the baseline
    baseline = rss_bytes()
    model = build_partitioned(UltraFluxTransformer2DModel, transformer, config)
    peak = peak_rss_bytes()

    params = dict(model.named_parameters())
    report = {
        "rank": dist.rank, "world_size": dist.world_size, "baseline": baseline, "peak": peak,
        "numel": sum(p.ds_numel for p in params.values()),
        "largest_numel": max(p.ds_numel for p in params.values()),
        "share_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params.values()),
        "all_partitioned": all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in params.values()),
        "dtypes": sorted({str(p.ds_tensor.dtype) for p in params.values()}),
    }
    # Every gathered parameter equals the tensor as safetensors' own reader sees it (collective: all ranks).
    entries = checkpoint_index(transformer)
    unequal = []
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            with safe_open(str(entries[name].path), framework="pt") as fh:
                expected = fh.get_tensor(name)
            if not torch.equal(param.data, expected):
                unequal.append(name)
    report["unequal"] = unequal
    report["checked"] = len(params)
    out.joinpath(f"rank{dist.rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wide") / "flux-dev-1x1"
    cmd = [sys.executable, "-c", "from ultraflux.cli import main; main()", "init-tiny", str(directory),
           "--width-preset", "flux-dev", "--layers", "1", "--single-layers", "1", "--dtype", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return directory


@pytest.mark.slow
def test_two_ranks_build_partitioned_below_half_the_fp32_model(wide_checkpoint: Path, tmp_path: Path) -> None:
    from ultraflux_model.training.distributed import free_port
    from ultraflux_model.training.launch import launch_env

    index = wide_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1  # the sharded layout
    env = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE), str(wide_checkpoint), str(tmp_path)]
    proc = subprocess.run(["flock", "/tmp/bigmem.lock", *cmd], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        fp32_bytes = report["numel"] * 4
        grown = report["peak"] - report["baseline"]
        print(f"rank {report['rank']}: peak - baseline {grown / 2**20:.0f} MiB, fp32 model {fp32_bytes / 2**20:.0f} "
              f"MiB, own share {report['share_bytes'] / 2**20:.0f} MiB")
        assert report["numel"] == 545_548_096  # the real-width 1+1-block model
        assert report["all_partitioned"] and report["dtypes"] == ["torch.bfloat16"]
        assert report["share_bytes"] == pytest.approx(report["numel"] * 2 / 2, rel=1e-3)
        assert grown < 0.5 * fp32_bytes
        # ... and, more tightly, the rank's share plus one layer (the largest tensor in fp32, as built) and
        # 20 % of that share for allocator and bookkeeping: a rank holding the whole model would be far above.
        assert grown < 1.2 * report["share_bytes"] + report["largest_numel"] * 4
        assert report["checked"] == 66 and report["unequal"] == []


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
