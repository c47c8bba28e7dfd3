"""Row-streamed decode of a diffusers VAE ``Decoder``: the full decode's numbers at a fraction of its memory.

A 4096² decode holds several full-resolution activations at once (a 128-channel 4096² fp32 map is 8.6 GB).
Overlapping spatial tiles would not reproduce the full decode, because every GroupNorm normalises over the
whole image and the mid block attends globally. Instead each layer runs over horizontal stripes: GroupNorm
statistics are gathered over the whole tensor first (float64 sums), then each stripe is normalised,
activated and convolved with exactly the halo rows its 3×3 kernel needs.

What is held at full size is chosen so the peak stays near one activation of the last up block:
* an upsampler's output (4× its input) is never stored: the next resnet reads it as a :class:`Lazy` tensor
  whose stripes are recomputed from the stored input on demand;
* in the last up block (the widest activations) a resnet's inner activation is not stored either: it is
  recomputed per stripe from the block input, and the output is written into the input's own storage
  (:class:`InPlaceRows` keeps the few original rows the next stripe's halo still needs);
* the final (stride-2) upsample, SiLU and ``conv_out`` run per stripe, so the widest tensor never exists.
Stripes hold a bounded number of elements, so the widest layers get the fewest rows. Recomputing costs time
(measured in ``benchmarks/bench_vae_decode.py``); the result equals the full decode up to float rounding.

The official UltraFlux "partitioned" decode equals the full decode with ``conv_out`` evaluated on an input
padded (2, 0) instead of (1, 1) on each axis (fixture-verified: ``part[..., 1:, 1:] == full[..., :-1, :-1]``);
``conv_out_padding`` selects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

RowFn = Callable[[int, int], torch.Tensor]
Padding = tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)
SAME: Padding = (1, 1, 1, 1)
OFFICIAL_PARTITIONED: Padding = (2, 0, 2, 0)


STRIPE_CHANNELS = 32  # a stripe holds about tile_pixels × 32 elements, whatever the layer's channel count


@dataclass
class Lazy:
    """A ``[B, C, height, width]`` tensor given by its rows: ``rows(a, b)`` returns rows ``[a, b)``.

    Either a stored tensor (:meth:`of`) or one computed stripe by stripe on demand; the last computed stripe
    is kept, so a residual read of rows a stripe already covered costs nothing.
    """

    fn: RowFn
    batch: int
    channels: int
    height: int
    width: int
    cache: bool = True
    _last: tuple[int, int, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, x: torch.Tensor) -> Lazy:
        return cls(lambda a, b: x[:, :, a:b], *x.shape, cache=False)

    def new_empty(self, like: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """An uninitialised full-size tensor (``channels`` or this one's) with ``like``'s dtype and device."""
        return like.new_empty(self.batch, channels or self.channels, self.height, self.width)

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self._last is not None and self._last[0] <= a and b <= self._last[1]:
            lo, _, t = self._last
            return t[:, :, a - lo : b - lo]
        t = self.fn(a, b)
        if self.cache:
            self._last = (a, b, t)
        return t


class InPlaceRows:
    """Rows of ``x`` that stay readable while ``x`` is overwritten from the top, stripe after stripe.

    Before rows ``[r0, r1)`` are written, the original rows ``[r1 - halo, r1)`` are copied aside, so a later
    stripe reading up to ``halo`` rows above its start still sees the input, not the output.
    """

    def __init__(self, x: torch.Tensor, halo: int) -> None:
        self.x, self.halo, self.written = x, halo, 0
        self.saved = x[:, :, :0].clone()

    def __call__(self, a: int, b: int) -> torch.Tensor:
        if a >= self.written:
            return self.x[:, :, a:b]
        saved_at = self.written - self.saved.shape[2]
        if a < saved_at:
            raise RuntimeError(f"row {a} was overwritten (only rows from {saved_at} are kept)")  # a bug, not input
        head = self.saved[:, :, a - saved_at : b - saved_at]
        return head if b <= self.written else torch.cat([head, self.x[:, :, self.written : b]], dim=2)

    def before_write(self, r0: int, r1: int) -> None:
        self.saved = self(max(r1 - self.halo, 0), r1).clone()
        self.written = r1


def group_stats(x: Lazy, num_groups: int, eps: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/std of ``x [B, C, H, W]`` (biased variance, as GroupNorm).

    Each stripe's ``var_mean`` (float32, numerically stable) is merged into running float64 moments with
    Chan's parallel update, so the result does not depend on the stripe height beyond float rounding.
    Returns two float64 tensors ``[B, G]``.
    """
    count = torch.zeros((), dtype=torch.float64)
    mean = m2 = None
    for r0 in range(0, x.height, rows):
        part = x.rows(r0, min(x.height, r0 + rows))
        part = part.reshape(part.shape[0], num_groups, -1)
        var_i, mean_i = torch.var_mean(part.float(), dim=-1, correction=0)
        if mean is None:
            mean, m2 = torch.zeros_like(mean_i, dtype=torch.float64), torch.zeros_like(mean_i, dtype=torch.float64)
        n_i = float(part.shape[-1])
        delta = mean_i.double() - mean
        total = count + n_i
        mean = mean + delta * (n_i / total)
        m2 = m2 + var_i.double() * n_i + delta.square() * (count * n_i / total)
        count = total
    return mean, (m2 / count + eps).rsqrt()


def group_norm_rows(x: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply ``norm`` to a stripe ``x [B, C, h, W]`` with whole-image statistics from :func:`group_stats`.

    Folded into one multiply-add per element: ``x·(γ·rstd) + (β − mean·γ·rstd)``.
    """
    mean, rstd = stats
    b, c = x.shape[:2]
    per_channel = c // norm.num_groups
    scale = rstd.repeat_interleave(per_channel, dim=1)
    shift = -mean.repeat_interleave(per_channel, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    return torch.addcmul(shift.to(x.dtype).view(b, c, 1, 1), x, scale.to(x.dtype).view(b, c, 1, 1))


def conv_window(conv: nn.Conv2d, rows_of_input: RowFn, height: int, r0: int, r1: int, padding: Padding = SAME) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``conv(pad(input))`` for a stride-1 ``conv``; the input (``height`` rows) is read
    through ``rows_of_input`` with exactly the halo rows the kernel needs."""
    left, right, top, bottom = padding
    k = conv.kernel_size[0]
    lo, hi = r0 - top, r1 - top + k - 1
    a, b = max(lo, 0), min(hi, height)
    if padding == (k // 2,) * 4:
        # Symmetric "same" padding: convolve the stripe with its halo as is and drop the halo rows' outputs
        # (they saw zero padding instead of their neighbours); no padded copy of the stripe is made.
        return F.conv2d(rows_of_input(a, b), conv.weight, conv.bias, padding=k // 2)[:, :, r0 - a : r1 - a]
    return F.conv2d(F.pad(rows_of_input(a, b), (left, right, a - lo, hi - b)), conv.weight, conv.bias)


def conv_rows(
    conv: nn.Conv2d,
    rows_of_input: RowFn,
    height: int,
    out: torch.Tensor,
    rows: int,
    padding: Padding = SAME,
    residual: RowFn | None = None,
    divisor: float = 1.0,
    before_write: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``out = (conv(pad(input)) + residual) / divisor`` computed stripe by stripe, for a stride-1 ``conv``.

    ``rows_of_input(a, b)`` returns rows ``[a, b)`` of the (never materialised) conv input of ``height`` rows;
    ``residual(r0, r1)`` rows of the skip branch. ``out`` must have ``height + top + bottom - k + 1`` rows; it
    may be the input's own storage when ``before_write`` (e.g. :meth:`InPlaceRows.before_write`) keeps what
    later stripes still read; every read of a stripe happens before its write.
    """
    for r0 in range(0, out.shape[2], rows):
        r1 = min(out.shape[2], r0 + rows)
        y = conv_window(conv, rows_of_input, height, r0, r1, padding)
        if residual is not None:
            y = (residual(r0, r1) + y) / divisor
        if before_write is not None:
            before_write(r0, r1)
        out[:, :, r0:r1] = y
    return out


def _act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """In-place activation on a fresh stripe tensor (SiLU is the only activation of Flux VAEs)."""
    return F.silu(x, inplace=True) if isinstance(act, nn.SiLU) else act(x)


def _rows_for(channels: int, width: int, tile_pixels: int) -> int:
    """Stripe height holding about ``tile_pixels × STRIPE_CHANNELS`` elements: fewer rows for wider layers."""
    return max(1, tile_pixels * STRIPE_CHANNELS // max(1, channels * width))


def _resnet(block: nn.Module, x: Lazy, tile_pixels: int, *, recompute_mid: bool, storage: torch.Tensor | None) -> torch.Tensor:
    """diffusers ``ResnetBlock2D`` (no temb, no resampling) over stripes of ``x``.

    ``recompute_mid``: the conv1 output is recomputed per stripe (with its halo) instead of stored.
    ``storage``: ``x``'s own tensor, reused for the output (same channels, no shortcut); otherwise the
    output is a new tensor. Held at full size: the output, ``storage`` (the same) and, unless recomputed,
    the conv1 output.
    """
    act, h, w = block.nonlinearity, x.height, x.width
    guard = None
    if storage is not None:
        guard = InPlaceRows(storage, halo=2 if recompute_mid else 0)
        x = Lazy(guard, x.batch, x.channels, h, w, cache=False)
    stats1 = group_stats(x, block.norm1.num_groups, block.norm1.eps, _rows_for(x.channels, w, tile_pixels))

    def conv1_input(a: int, b: int) -> torch.Tensor:
        return _act_(act, group_norm_rows(x.rows(a, b), block.norm1, stats1))

    c_mid = block.conv1.out_channels
    rows_mid = _rows_for(max(c_mid, x.channels), w, tile_pixels)
    if recompute_mid:
        mid = Lazy(lambda a, b: conv_window(block.conv1, conv1_input, h, a, b), x.batch, c_mid, h, w, cache=False)
    else:
        mid = Lazy.of(conv_rows(block.conv1, conv1_input, h, x.new_empty(block.conv1.weight, c_mid), rows_mid))
    stats2 = group_stats(mid, block.norm2.num_groups, block.norm2.eps, rows_mid)
    shortcut = block.conv_shortcut
    out = storage if storage is not None else x.new_empty(block.conv2.weight, block.conv2.out_channels)
    return conv_rows(
        block.conv2,
        lambda a, b: _act_(act, group_norm_rows(mid.rows(a, b), block.norm2, stats2)),
        h,
        out,
        max(rows_mid, guard.halo if guard else 1),
        residual=(lambda a, b: shortcut(x.rows(a, b))) if shortcut is not None else x.rows,
        divisor=block.output_scale_factor,
        before_write=guard.before_write if guard else None,
    )


def _upsample_rows(x: Lazy, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> RowFn:
    """Rows ``[a, b)`` of ``nearest×2(fn(x))`` computed from the ``x`` rows they replicate."""

    def rows_of(a: int, b: int) -> torch.Tensor:
        src = fn(x.rows(a // 2, (b + 1) // 2))
        up = F.interpolate(src, scale_factor=2.0, mode="nearest")
        return up[:, :, a - 2 * (a // 2) : a - 2 * (a // 2) + (b - a)]

    return rows_of


def _upsampled_conv(upsampler: nn.Module, x: torch.Tensor) -> Lazy:
    """diffusers ``Upsample2D`` (nearest ×2, 3×3 conv) as a :class:`Lazy` tensor over the stored ``x``."""
    src, height = Lazy.of(x), x.shape[2] * 2
    return Lazy(
        lambda a, b: conv_window(upsampler.conv, _upsample_rows(src), height, a, b),
        x.shape[0],
        upsampler.conv.out_channels,
        height,
        x.shape[3] * 2,
    )


def _materialise(x: Lazy, like: torch.Tensor, tile_pixels: int) -> torch.Tensor:
    """Store a :class:`Lazy` tensor stripe by stripe."""
    out, rows = x.new_empty(like), _rows_for(x.channels, x.width, tile_pixels)
    for r0 in range(0, x.height, rows):
        out[:, :, r0 : r0 + rows] = x.rows(r0, min(x.height, r0 + rows))
    return out


@torch.no_grad()
def streamed_decode(
    decoder: nn.Module, z: torch.Tensor, *, stride: int, tile_pixels: int = 1 << 19, conv_out_padding: Padding = SAME
) -> torch.Tensor:
    """Decode ``z [B, C_lat, h, w]`` → ``[B, 3, h·f, w·f]`` with a diffusers VAE ``Decoder``.

    ``stride`` 2 means the decoder's head is norm → nearest×2 → SiLU → conv_out (the F16 VAE).
    ``tile_pixels`` bounds each stripe to about ``tile_pixels × 32`` elements (rows shrink as layers widen).
    """
    if stride not in (1, 2):
        raise ValueError(f"streamed decode supports VAE stride 1 or 2, got {stride}")
    sample: torch.Tensor = decoder.mid_block(decoder.conv_in(z))
    pending: Lazy | None = None  # an upsampler output, consumed lazily by the next resnet
    last = len(decoder.up_blocks) - 1
    for index, block in enumerate(decoder.up_blocks):
        for resnet in block.resnets:
            source = pending or Lazy.of(sample)
            in_place = pending is None and resnet.conv_shortcut is None
            sample = _resnet(resnet, source, tile_pixels, recompute_mid=index == last,
                             storage=sample if in_place else None)  # fmt: skip
            pending = None
        for upsampler in block.upsamplers or ():
            if pending is not None:
                raise ValueError("two upsamplers in a row are not a diffusers decoder layout")
            pending = _upsampled_conv(upsampler, sample)
    if pending is not None:  # a decoder ending on an upsampler (not Flux's layout): store its output
        sample = _materialise(pending, sample, tile_pixels)
    norm, act = decoder.conv_norm_out, nn.SiLU()
    x = Lazy.of(sample)
    stats = group_stats(x, norm.num_groups, norm.eps, _rows_for(x.channels, x.width, tile_pixels))
    left, right, top, bottom = conv_out_padding
    height = sample.shape[2] * stride
    out = sample.new_empty(
        sample.shape[0],
        decoder.conv_out.out_channels,
        height + top + bottom - 2,
        sample.shape[3] * stride + left + right - 2,
    )

    def head(t: torch.Tensor) -> torch.Tensor:
        return _act_(act, group_norm_rows(t, norm, stats))

    if stride == 1:
        rows_of: RowFn = lambda a, b: head(x.rows(a, b))  # noqa: E731
    else:
        rows_of = _upsample_rows(x, head)
    rows = _rows_for(x.channels, x.width * stride, tile_pixels)
    return conv_rows(decoder.conv_out, rows_of, height, out, rows, conv_out_padding)
