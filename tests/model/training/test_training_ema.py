"""The EMA follows the optimizer's fp32 master weights, not the bf16 parameters (DeepSpeed ZeRO-3, bf16, CPU/gloo).

With lr 1e-6 the AdamW updates are below bf16's resolution at most of these weights: most bf16 parameters do not
move, the fp32 masters all do, and the EMA must follow the masters exactly (not the EMA of the bf16 parameters).
"""

from __future__ import annotations

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from ultraflux_model.config import DeepSpeedConfig  # noqa: E402
from ultraflux_model.training.distributed import init_distributed  # noqa: E402
from ultraflux_model.training.ema import ShardedEma  # noqa: E402

DECAY = 0.5  # large steps, so three updates move the average visibly


def test_ema_tracks_the_fp32_master_weights_of_bf16_zero3() -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    init_distributed(DeepSpeedConfig(backend="gloo"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    params = dict(engine.module.named_parameters())
    assert all(p.ds_tensor.dtype == torch.bfloat16 for p in params.values())

    def full(getter) -> dict[str, torch.Tensor]:  # collective gathers of every parameter
        return {name: getter(p).detach().float().clone() for name, p in params.items()}

    def bf16_params(p: torch.nn.Parameter) -> torch.Tensor:
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.clone()

    ema = ShardedEma(engine.module, DECAY)
    expected = full(safe_get_full_fp32_param)
    bf16_before, master_before = full(bf16_params), dict(expected)
    of_bf16 = dict(bf16_before)  # what an EMA of the bf16 parameters would hold
    x = torch.randn(4, 16).to(torch.bfloat16)
    for step in range(3):
        loss = engine(x[step : step + 1]).float().square().mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        for name, master in full(safe_get_full_fp32_param).items():
            expected[name] = expected[name].lerp(master, 1.0 - DECAY)
        for name, value in full(bf16_params).items():
            of_bf16[name] = of_bf16[name].lerp(value, 1.0 - DECAY)

    bf16_after, master_after = full(bf16_params), full(safe_get_full_fp32_param)
    unmoved = sum(int((bf16_after[n] == bf16_before[n]).sum()) for n in params) / sum(p.ds_numel for p in params.values())
    assert unmoved > 0.9  # the situation this guards: updates mostly lost to bf16 rounding
    for name, param in params.items():
        assert (master_after[name] != master_before[name]).all(), name  # every master weight moved
        shadow = ema.shadow[name][: param.ds_numel].view(param.ds_shape)  # one rank: its shard is the whole
        torch.testing.assert_close(shadow, expected[name], rtol=0, atol=0)
        assert not torch.equal(shadow, of_bf16[name]), name
