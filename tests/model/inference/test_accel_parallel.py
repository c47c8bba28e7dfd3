"""Context parallelism (``generate.accel.parallel: context``) on two gloo ranks equals one process.

Run by pytest (the test launches this file under torchrun) and by torchrun (``__main__``). The image is 128×256 on
the tiny model, whose RoPE training window is 4 tokens: its 8 token rows take the YaRN branch, whose switch and scale
depend on the span of the whole image while each rank holds half of the rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve()
SIZE = (128, 256)  # width, height: 4 × 8 tokens


def rank_main(checkpoint: Path, out: Path) -> None:
    """One rank: the transformer alone (with and without the span reduction), then ``generate``."""
    import torch
    import torch.distributed as dist
    from ultraflux_model.checkpoint.tiny import tiny_transformer
    from ultraflux_model.config import AccelConfig
    from ultraflux_model.diffusion.latents import image_ids, text_ids
    from ultraflux_model.inference.accel import enable_context_parallel, init_context_parallel
    from ultraflux_model.inference.pipeline import generate

    accel = AccelConfig(parallel="context")
    init_context_parallel()
    torch.manual_seed(0)
    model = tiny_transformer().eval()
    gen = torch.Generator().manual_seed(1)
    rows, cols = SIZE[1] // 32, SIZE[0] // 32
    inputs = dict(hidden_states=torch.randn(1, rows * cols, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen),
                  timestep=torch.tensor([0.5]), img_ids=image_ids(rows, cols, device="cpu"),
                  txt_ids=text_ids(8, device="cpu"), guidance=torch.tensor([4.0]), return_dict=False)  # fmt: skip
    with torch.no_grad():
        single = model(**inputs)[0]
        enable_context_parallel(model, accel)
        split = model(**inputs)[0]
        group = model.pos_embed.span_group
        model.pos_embed.span_group = None  # each rank's own span: what the reduction is for
        local_span = model(**inputs)[0]
        model.pos_embed.span_group = group
    made = generate(checkpoint, ["a red fox in snow"], [SIZE], steps=3, dtype="fp32", out_dir=out / "parallel",
                    progress=False, accel=accel)  # fmt: skip
    report = {"rank": dist.get_rank(), "world": dist.get_world_size(), "images": [str(m.path) for m in made],
              "split_vs_single": (split - single).abs().max().item(),
              "local_span_vs_single": (local_span - single).abs().max().item()}  # fmt: skip
    out.joinpath(f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from ultraflux_model.inference.pipeline import generate
    from ultraflux_model.training.distributed import free_port
    from ultraflux_model.training.launch import launch_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE), str(tiny_checkpoint), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    for report in reports:
        assert report["split_vs_single"] < 1e-5, report
        assert report["local_span_vs_single"] > 1e-4, report  # without the reduced span the ranks would differ
    assert len(reports[0]["images"]) == 1 and reports[1]["images"] == []  # rank 0 alone decodes and writes
    parallel = np.asarray(Image.open(reports[0]["images"][0])).astype(int)
    one = generate(tiny_checkpoint, ["a red fox in snow"], [SIZE], steps=3, dtype="fp32", device="cpu",
                   out_dir=tmp_path / "one", progress=False)[0]  # fmt: skip
    assert np.abs(parallel - np.asarray(Image.open(one.path)).astype(int)).max() <= 1
    sidecar = json.loads(Path(reports[0]["images"][0]).with_suffix(".json").read_text())
    assert sidecar["accel"]["parallel"] == "context"


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
