"""The tiled decode's stripe streams: rolling-window convs, the sub-pixel upsample conv, the residual trail, the
streamed GroupNorm statistics, and tiled == full at odd sizes and aspect ratios, each conv row computed once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from ultraflux_model import UltraFluxAutoencoderKL
from ultraflux_model.vae.streamed_decode import (
    OFFICIAL_PARTITIONED,
    SAME,
    STORE_BYTES,
    Trail,
    convolved,
    group_stats,
    streamed_decode,
    stripes_of,
    subpixel_kernels,
    upsampled_conv,
    write_rows,
)


def _whole(stripes) -> torch.Tensor:
    return torch.cat(list(stripes), dim=2)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 100])
@pytest.mark.parametrize("padding,k", [(SAME, 3), (OFFICIAL_PARTITIONED, 3), ((1, 1, 1, 1), 2), ((0, 0, 0, 0), 3)])
def test_rolling_conv_equals_the_whole_conv(rows, padding, k):
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 11, 6, dtype=torch.float64), torch.randn(4, 3, k, k, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    want = F.conv2d(F.pad(x, padding), w, b)
    got = _whole(convolved(w, b, stripes_of(x, rows), padding))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_rolling_conv_reads_each_input_row_once_and_may_write_over_its_input():
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 9, 5, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    want = F.conv2d(x, w, padding=1)
    seen: list[int] = []

    def stripes():
        for s in stripes_of(x, 2):
            seen.append(s.shape[2])
            yield s

    # written into the input's own storage (as a resnet's output is): the carried halo rows must be copies
    got = write_rows(convolved(w, None, stripes()), x)
    assert seen == [2, 2, 2, 2, 1]  # every stripe read once
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_upsampled_conv_equals_nearest_x2_then_conv(rows, dtype):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    x = torch.randn(1, 3, 7, 4, dtype=dtype)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = _whole(upsampled_conv(conv, stripes_of(x, rows)))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0}[dtype]  # bf16: the very same ops
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_subpixel_kernels_merge_the_taps_each_phase_reads():
    w = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    phases = subpixel_kernels(w).view(2, 2, 2, 2)  # [p, q, tap row, tap col]
    # phase (0, 0) reads input rows/cols (i-1, i): taps (w0, w1 + w2) on each axis
    assert phases[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1) reads (i, i+1): taps (w0 + w1, w2)
    assert phases[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert phases.sum().item() == 4 * w.sum().item()


def test_trail_reads_rows_behind_the_front_and_refuses_dropped_ones():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    trail = Trail(stripes_of(x, 3))
    it = iter(trail)
    next(it), next(it)  # rows [0, 6) went by
    assert trail.rows(1, 5).flatten().tolist() == [1, 2, 3, 4]  # across two stripes
    assert trail.rows(4, 6).flatten().tolist() == [4, 5]  # drops the stripe [0, 3)
    with pytest.raises(RuntimeError, match="not kept"):
        trail.rows(2, 4)
    with pytest.raises(RuntimeError, match="not kept"):
        trail.rows(5, 7)  # not read yet


@pytest.mark.parametrize("rows", [1, 3, 13])
def test_streamed_group_stats_equal_group_norm(rows):
    torch.manual_seed(2)
    x = 3 + 2 * torch.randn(2, 8, 13, 5)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    mean, rstd = group_stats(stripes_of(x, rows), norm)
    groups = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, groups.mean(-1))
    torch.testing.assert_close(rstd, (groups.var(-1, correction=0) + 1e-6).rsqrt())


def _vae(blocks, layers, stride, groups=4):
    torch.manual_seed(0)
    vae = UltraFluxAutoencoderKL(
        block_out_channels=blocks, layers_per_block=layers, norm_num_groups=groups, latent_channels=4, stride=stride,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():  # off the default init so norms and biases matter
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.mark.parametrize(
    "latent_hw,store_bytes",
    # 1:2, 2:1, 2.4:1 (≈ 2.39:1 cinema), odd heights; inner activations stored, or all recomputed (as at 4096²)
    [((3, 6), 0), ((6, 3), STORE_BYTES), ((5, 12), 0), ((7, 3), 0), ((7, 3), STORE_BYTES)],
)
def test_tiled_equals_full_at_odd_sizes_and_aspect_ratios(latent_hw, store_bytes):
    vae = _vae((8, 16, 16), 1, 2)
    assert sum(r.conv_shortcut is not None for b in vae.decoder.up_blocks for r in b.resnets) == 1
    z = torch.randn(1, 4, *latent_hw)
    with torch.no_grad():
        full = vae.decode(z, mode="full").sample
        # stripes of 1 to 6 rows, whose heights divide no layer's height (odd heights), and the whole image
        for tile in (11, 1 << 20):
            tiled = streamed_decode(vae.decoder, z, stride=2, tile_pixels=tile, store_bytes=store_bytes)
            torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)
        official = streamed_decode(vae.decoder, z, stride=2, tile_pixels=37, conv_out_padding=OFFICIAL_PARTITIONED,
                                   store_bytes=store_bytes)  # fmt: skip
    torch.testing.assert_close(official[..., 1:, 1:], full[..., :-1, :-1], atol=1e-5, rtol=0)
    assert full.shape[-2:] == (latent_hw[0] * 8, latent_hw[1] * 8)


def test_tiled_decode_computes_each_conv_row_about_once():
    """Multiply-adds (counted, not timed) of the tiled decode against the full one: halo rows are carried, not
    recomputed, so with many thin stripes the count stays that of the plan (the last block's conv1 and the
    upsampler outputs computed twice, the latter in sub-pixel form at 4/9 of the cost)."""
    vae = _vae((8, 16, 32, 32), 1, 2)
    z = torch.randn(1, 4, 8, 8)

    def flops(decode) -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            decode()
        return counter.get_total_flops()

    full = flops(lambda: vae.decode(z, mode="full"))
    thin, whole = (flops(lambda t=t: streamed_decode(vae.decoder, z, stride=2, tile_pixels=t, store_bytes=0))
                   for t in (256, 1 << 20))  # fmt: skip
    assert thin <= 1.01 * whole  # 4 to 16 stripes per layer cost what one stripe does
    assert whole <= 1.5 * full  # every conv1 twice (store_bytes=0), each upsampler output 2-3× at 4/9: nothing more
    stored = flops(lambda: streamed_decode(vae.decoder, z, stride=2, tile_pixels=1 << 20))  # all stored
    assert stored <= 1.01 * full
    assert flops(lambda: streamed_decode(vae.decoder, z, stride=2, tile_pixels=256)) <= 1.05 * stored  # 1 row/edge
