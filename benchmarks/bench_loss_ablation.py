"""Loss ablation: what the SNR-aware Huber *wavelet* loss changes against its controls, on the tiny model.

Every variant trains the tiny UltraFlux transformer (``checkpoint.tiny.tiny_transformer``) from the same
initialisation on the same synthetic latents, with the trainer's own noise/timestep draws
(``training.trainer.draw_noise_and_t``, logit-normal t) and x̂₀ (``predict_x0``); only the loss differs:

- ``velocity-mse``: the rectified-flow default, mean (v − (ε − z))², written as mean((x̂₀ − z)/t)² (the same number:
  v − (ε − z) = (z − x̂₀)/t) so that its gradient w.r.t. x̂₀ is measured like the others';
- ``spatial-huber``: ω(t)·pseudo-Huber(x̂₀ − z; c(t)) in latent space (``diffusion.losses.snr_huber_spatial_loss``);
- ``wavelet-huber``: today's loss (``LossConfig()``, band weights 1, 1, 1, 1);
- ``wavelet-huber-w…``: the same with ``LossConfig.band_weights`` (``--band-weights``, LL LH HL HH).

Reported per variant (mean ± std over ``--seeds``, each seed a new model initialisation, data and noise):
``hf_share_first/last``: the high-frequency (LH + HL + HH) share of ‖∂loss/∂x̂₀‖² (``band_energy_shares``), averaged
over the first / last fifth of the steps; ``err_LL`` … ``err_HH``: mean squared error of x̂₀ per Haar band on
held-out latents (fixed noise, t ∈ ``--eval-t``) after training, and ``err_total`` their mean (= the latent MSE).

Synthetic latents: 16 channels, a sum of upsampled noise at 2×2, 4×4 and 8×8 (amplitudes 1, 0.6, 0.35) plus
0.25 i.i.d. noise, normalised to unit std, so most energy is low-frequency as in real VAE latents. The default
settings are 8 runs (4 variants × 2 seeds) of about 70 s of CPU time each (150 steps), ~10 minutes on 2 free cores:

    python -m benchmarks.bench_loss_ablation
    python -m benchmarks.bench_loss_ablation --steps 40 --seeds 0   # smoke run

Writes ``benchmarks/results/loss_ablation.{csv,json}`` (one row per variant and seed, plus the mean rows) and
prints the table of means.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from ultraflux_model.checkpoint.tiny import POOLED_DIM, TEXT_DIM, tiny_transformer
from ultraflux_model.config import LossConfig, StageConfig, TimestepConfig
from ultraflux_model.diffusion.losses import (
    BANDS,
    band_energy_shares,
    haar_bands,
    snr_huber_spatial_loss,
    training_loss,
)
from ultraflux_model.training.trainer import draw_noise_and_t, predict_x0

from benchmarks.report import print_rows, save_rows

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x̂₀, z, t) -> scalar
TEXT_TOKENS = 8


def synthetic_latents(n: int, side: int, seed: int) -> torch.Tensor:
    """``[n, 16, side, side]`` low-frequency-dominated latents of unit std (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    z = 0.25 * torch.randn(n, 16, side, side, generator=gen)
    for cells, amplitude in ((2, 1.0), (4, 0.6), (8, 0.35)):
        coarse = torch.randn(n, 16, cells, cells, generator=gen)
        z += amplitude * torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    return z / z.std()


def make_batch(latents: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The trainer's batch dict: latents plus fixed random text conditioning (one prompt per latent)."""
    gen = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    return {
        "latents": latents,
        "prompt_embeds": torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=gen),
        "pooled": torch.randn(n, POOLED_DIM, generator=gen),
    }


def variants(band_weights: list[tuple[float, float, float, float]]) -> dict[str, LossFn]:
    spatial = {k: v for k, v in LossConfig().model_dump().items() if k != "band_weights"}
    out: dict[str, LossFn] = {
        "velocity-mse": lambda x0, z, t: ((x0 - z) / t.view(-1, 1, 1, 1)).square().mean(),
        "spatial-huber": lambda x0, z, t: snr_huber_spatial_loss(x0, z, t, **spatial),
        "wavelet-huber": lambda x0, z, t: training_loss(x0, z, t, cfg=LossConfig(), kernel="auto"),
    }
    for weights in band_weights:
        cfg = LossConfig(band_weights=weights)
        name = "wavelet-huber-w" + ",".join(f"{w:g}" for w in weights)
        out[name] = lambda x0, z, t, cfg=cfg: training_loss(x0, z, t, cfg=cfg, kernel="auto")
    return out


def train_and_evaluate(loss_fn: LossFn, args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = tiny_transformer()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train = make_batch(synthetic_latents(args.train_latents, args.side, seed=1000 + seed), seed=2000 + seed)
    held_out = make_batch(synthetic_latents(args.eval_latents, args.side, seed=3000 + seed), seed=4000 + seed)
    stage = StageConfig(micro_batch=args.batch, global_batch=args.batch)
    order = torch.Generator().manual_seed(5000 + seed)
    hf_shares = []
    for step in range(args.steps):
        index = torch.randperm(args.train_latents, generator=order)[: args.batch]
        batch = {k: v[index] for k, v in train.items()}
        noise, t = draw_noise_and_t(
            tuple(batch["latents"].shape),
            0,
            seed=seed,
            stage_index=0,
            step=step,
            stage=stage,
            timesteps=TimestepConfig(),
        )
        pred_x0, target = predict_x0(model, batch, noise, t, guidance=3.5, dtype=torch.float32)
        pred_x0.retain_grad()
        loss = loss_fn(pred_x0, target, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hf_shares.append(band_energy_shares(pred_x0.grad)[1:].sum().item())
        optimizer.step()

    model.eval()
    errors = torch.zeros(4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6000 + seed)
    with torch.no_grad():
        for t_value in args.eval_t:
            noise = torch.randn(held_out["latents"].shape, generator=gen)
            t = torch.full((args.eval_latents,), t_value)
            pred_x0, target = predict_x0(model, held_out, noise, t, guidance=3.5, dtype=torch.float32)
            errors += haar_bands((pred_x0 - target).double()).square().mean(dim=(0, 2, 3, 4))
    errors /= len(args.eval_t)
    fifth = max(1, args.steps // 5)
    row = {"hf_share_first": statistics.fmean(hf_shares[:fifth]), "hf_share_last": statistics.fmean(hf_shares[-fifth:])}
    row.update({f"err_{band}": errors[k].item() for k, band in enumerate(BANDS)})
    row["err_total"] = errors.mean().item()  # W is orthonormal: the mean band MSE is the latent MSE
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--side", type=int, default=16, help="latent side (16 = a 256 px image)")
    parser.add_argument("--train-latents", type=int, default=64)
    parser.add_argument("--eval-latents", type=int, default=32)
    parser.add_argument("--eval-t", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--band-weights",
        type=float,
        nargs=4,
        action="append",
        metavar=("LL", "LH", "HL", "HH"),
        help="a weighted wavelet-Huber variant (repeatable); default: 1 2 2 2",
    )
    args = parser.parse_args()
    weighted = [tuple(w) for w in (args.band_weights or [[1.0, 2.0, 2.0, 2.0]])]

    rows = []
    metrics = ["hf_share_first", "hf_share_last", *(f"err_{b}" for b in BANDS), "err_total"]
    for name, loss_fn in variants(weighted).items():
        per_seed = []
        for seed in args.seeds:
            started = time.perf_counter()
            result = train_and_evaluate(loss_fn, args, seed)
            per_seed.append(result)
            rows.append({"variant": name, "seed": str(seed), **result, "seconds": time.perf_counter() - started})
            print(f"{name} seed {seed}: {rows[-1]['seconds']:.0f}s", flush=True)
        mean = {m: statistics.fmean(r[m] for r in per_seed) for m in metrics}
        spread = {f"{m}_std": statistics.pstdev(r[m] for r in per_seed) for m in metrics}
        rows.append({"variant": name, "seed": "mean", **mean, "seconds": None, **spread})
        keys = list(dict.fromkeys(k for row in rows for k in row))
        save_rows([{k: row.get(k) for k in keys} for row in rows], "loss_ablation")  # after each variant: long runs
    means = [row for row in rows if row["seed"] == "mean"]
    print_rows(
        means,
        ["variant", *metrics, "err_total_std"],
        f"loss ablation (tiny model, {args.steps} steps, batch {args.batch}, seeds {args.seeds}; means)",
    )


if __name__ == "__main__":
    main()
