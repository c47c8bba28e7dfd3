"""Row-streamed decode of a diffusers VAE ``Decoder``: the full decode's numbers at a fraction of its memory.

A 4096² decode holds several full-resolution activations at once (a 128-channel 4096² fp32 map is 8.6 GB).
Overlapping spatial tiles would not reproduce the full decode, because every GroupNorm normalises over the
whole image and the mid block attends globally. Instead each resnet runs as a few top-to-bottom *sweeps*
over horizontal stripes. A sweep is a chain of stripe streams (norm + SiLU, 3×3 conv, nearest ×2 + conv);
a 3×3 conv over a stored tensor reads its halo rows in place (:func:`convolved_stored`), one over a computed
stream carries the last two rows of its input forward to the next stripe (a rolling window, :func:`convolved`),
so no row is computed twice within a sweep. GroupNorm needs its input's statistics before it can normalise the
first stripe, so each norm's input is either stored (its statistics gathered as it is written) or computed
twice: once for its statistics (float64 moments merged stripe by stripe) and once to be consumed.

What is held at full size is chosen so the peak stays near one activation of the last up block:
* an upsampler's output (4× its input) is never stored: the next resnet streams it from the stored input;
* a resnet's inner activation (conv1's output) larger than ``store_bytes`` (1 GiB: at 4096² in fp32 the last
  up block's, the widest) is not stored either: one sweep gathers its statistics, the next recomputes it and
  consumes it; a resnet's output is written into its input's own storage (each stripe after every read of it);
* the final (stride-2) upsample, SiLU and ``conv_out`` run per stripe, so the widest tensor never exists.
For float32 and float64 weights, nearest ×2 followed by a 3×3 conv runs as its sub-pixel form (one 2×2 conv
with four phase kernels, 4/9 of the multiply-adds; :func:`subpixel_kernels`), which pays for computing an
upsampler's output twice. The result equals the full decode up to float rounding; the cost against the full
decode is measured in ``benchmarks/bench_vae_decode.py``.

The official UltraFlux "partitioned" decode equals the full decode with ``conv_out`` evaluated on an input
padded (2, 0) instead of (1, 1) on each axis (fixture-verified: ``part[..., 1:, 1:] == full[..., :-1, :-1]``);
``conv_out_padding`` selects it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Stripes = Iterator[torch.Tensor]  # consecutive row stripes [B, C, rows, W] of one tensor, top to bottom
Padding = tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)
SAME: Padding = (1, 1, 1, 1)
OFFICIAL_PARTITIONED: Padding = (2, 0, 2, 0)


SUBPIXEL_DTYPES = (torch.float32, torch.float64)  # where merging taps rounds below the 1e-5 parity (not bf16/fp16)
# Stored up to this size, recomputed above: at 4096² (fp32) every inner activation but the last up block's (2 GiB)
STORE_BYTES = 1 << 30
STRIPE_CHANNELS = 32  # a stripe holds about tile_pixels × 32 elements, whatever the layer's channel count


def stripes_of(x: torch.Tensor, rows: int) -> Stripes:
    """Views of ``x [B, C, H, W]`` in stripes of ``rows`` rows."""
    for r0 in range(0, x.shape[2], rows):
        yield x[:, :, r0 : r0 + rows]


class Moments:
    """Per-(sample, group) mean and variance of a tensor seen stripe by stripe (biased variance, as GroupNorm).

    Each stripe's group moments come from torch's fused GroupNorm kernel (eps 0: variance = rstd⁻²; about 2.5×
    faster than ``var_mean`` on CPU) and are merged into running float64 moments with Chan's parallel update,
    so the result does not depend on the stripe height beyond float rounding.
    """

    def __init__(self, num_groups: int, eps: float) -> None:
        self.num_groups, self.eps = num_groups, eps
        self.count = 0.0
        self.mean: torch.Tensor | None = None  # [B, G] float64
        self.m2: torch.Tensor | None = None

    def add(self, stripe: torch.Tensor) -> None:
        b, c, h, w = stripe.shape
        _, mean_i, rstd_i = torch.native_group_norm(stripe.contiguous(), None, None, b, c, h * w, self.num_groups, 0.0)
        mean_i, var_i = mean_i.double().view(b, -1), rstd_i.double().pow(-2).view(b, -1)
        n_i = float(c // self.num_groups * h * w)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2, self.count = mean_i, var_i * n_i, n_i
            return
        delta = mean_i - self.mean
        total = self.count + n_i
        self.mean = self.mean + delta * (n_i / total)
        self.m2 = self.m2 + var_i * n_i + delta.square() * (self.count * n_i / total)
        self.count = total

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1/std)``, two float64 tensors ``[B, G]``."""
        if self.mean is None or self.m2 is None:
            raise ValueError("no stripes were seen")
        return self.mean, (self.m2 / self.count + self.eps).rsqrt()


def group_stats(stripes: Iterable[torch.Tensor], norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor statistics for ``norm`` of the tensor ``stripes`` make up, in one pass (see :class:`Moments`)."""
    moments = Moments(norm.num_groups, norm.eps)
    for stripe in stripes:
        moments.add(stripe)
    return moments.stats()


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


Stats = tuple[torch.Tensor, torch.Tensor]  # a GroupNorm's (mean, 1/std), float64 [B, G]


def _prepared(x: torch.Tensor, norm: nn.GroupNorm, stats: Stats, act: nn.Module) -> torch.Tensor:
    """``act(norm(x))`` of a stripe, as a new tensor."""
    y = group_norm_rows(x, norm, stats)
    return F.silu(y, inplace=True) if isinstance(act, nn.SiLU) else act(y)


def normed(stripes: Stripes, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor], act: nn.Module) -> Stripes:
    """``act(norm(x))`` per stripe; every output stripe is a new tensor (the input may be overwritten later)."""
    for stripe in stripes:
        y = _prepared(stripe, norm, stats, act)
        del stripe  # not held while suspended: a computed input stripe is freed as soon as its consumer drops it
        yield y


def upsampled(stripes: Stripes) -> Stripes:
    """Nearest ×2 per stripe (rows and columns)."""
    for stripe in stripes:
        yield F.interpolate(stripe, scale_factor=2.0, mode="nearest")


def convolved(
    weight: torch.Tensor, bias: torch.Tensor | None, stripes: Stripes, padding: Padding = SAME
) -> Stripes:
    """Stripes of ``conv2d(pad(x), weight, bias)`` (stride 1, ``k×k`` kernel) from the stripes of ``x``.

    The last ``k − 1`` input rows of each stripe are carried to the next one (a rolling window), so every
    output row is computed once; the top and bottom padding rows are zeros put around the first and the last
    stripe (one stripe is read ahead to know which is the last, so the bottom costs no extra conv call). An
    input stripe shorter than the window is held until the window fills. Output stripes are new tensors,
    ``H + top + bottom − k + 1`` rows in all.
    """
    left, right, top, bottom = padding
    k = weight.shape[2]
    stripes = iter(stripes)
    stripe = next(stripes, None)
    if stripe is None:
        return
    carry = stripe.new_zeros(*stripe.shape[:2], top, stripe.shape[3])
    while stripe is not None:
        ahead = next(stripes, None)
        tail = [] if ahead is not None else [stripe.new_zeros(*stripe.shape[:2], bottom, stripe.shape[3])]
        window = torch.cat([carry, stripe, *tail], dim=2)  # a copy: the carry never aliases the input
        stripe = ahead
        if window.shape[2] < k:
            carry = window
            continue
        # the carry is cloned so that the window (and nothing else) is held while this generator is suspended
        carry = window[:, :, window.shape[2] - (k - 1) :].clone()
        window = F.conv2d(window if left == right else F.pad(window, (left, right, 0, 0)), weight, bias,
                          padding=(0, left) if left == right else 0)  # fmt: skip
        yield window
        del window


def convolved_stored(
    conv: nn.Conv2d, x: torch.Tensor, rows: int, prepare: Callable[[torch.Tensor], torch.Tensor]
) -> Stripes:
    """Stripes of ``conv(prepare(x))`` (3×3, "same" padding) over a stored ``x``: no carried rows needed.

    Each stripe's window is ``prepare`` of the stored rows with its halo rows (``prepare`` is elementwise, e.g.
    norm + SiLU, so recomputing it on the halo costs next to nothing); inner stripes are convolved without
    vertical padding, the first and last with the conv's own (dropping the one output row the other edge gives).
    Nothing is copied to assemble a window.
    """
    height, pad = x.shape[2], conv.padding[0]
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        a, b = max(r0 - pad, 0), min(r1 + pad, height)
        p = pad if a == 0 or b == height else 0
        y = F.conv2d(prepare(x[:, :, a:b]), conv.weight, conv.bias, padding=(p, conv.padding[1]))
        start = r0 - a - (pad - p)
        yield y if y.shape[2] == r1 - r0 else y[:, :, start : start + r1 - r0]
        del y


# Nearest ×2 then a 3-tap "same" filter, per output phase p (even/odd position): the two input taps each phase
# reads (offsets −1, 0 for p = 0 and 0, +1 for p = 1) and which of the three filter taps add up on each.
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # [p, tap, k]


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The 3×3 ``weight [O, I, 3, 3]`` of a conv on a nearest-×2 input as four 2×2 phase kernels ``[4·O, I, 2, 2]``.

    Phase ``(p, q)`` (output row parity p, column parity q) is block ``2p + q``. Taps are summed in float64 and
    rounded once, so each phase kernel is the correctly rounded sum of the weights it merges.
    """
    taps = _PHASE_TAPS.to(weight.device)
    phases = torch.einsum("pak,oikl,qbl->pqoiab", taps, weight.double(), taps)
    return phases.reshape(4 * weight.shape[0], *weight.shape[1:2], 2, 2).to(weight.dtype)


def upsampled_conv(conv: nn.Conv2d, stripes: Stripes, phases: torch.Tensor | None = None) -> Stripes:
    """Stripes of ``conv(nearest×2(x))`` (a diffusers ``Upsample2D``'s conv, 3×3, padding 1) from stripes of ``x``.

    In float32/float64 the sub-pixel form: one 2×2 conv of ``x`` padded by one on each side with the four phase
    kernels of :func:`subpixel_kernels` (``phases``, computed when not given) gives ``Y [B, 4·O, H + 1, W + 1]``;
    output pixel ``(2i + p, 2j + q)`` is ``Y[phase (p, q), i + p, j + q]``. Output row pair ``i`` needs ``Y``
    rows ``i`` and ``i + 1``, so the last ``Y`` row is carried to the next stripe. Other dtypes run the plain
    ×2 and 3×3 conv (the full decode's ops: a merged bf16 weight would be rounded differently).
    """
    if conv.weight.dtype not in SUBPIXEL_DTYPES:
        yield from convolved(conv.weight, conv.bias, upsampled(stripes))
        return
    out_ch = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    carry: torch.Tensor | None = None
    for y in convolved(subpixel_kernels(conv.weight) if phases is None else phases, bias, stripes, (1, 1, 1, 1)):
        y = y if carry is None else torch.cat([carry, y], dim=2)
        pairs, width = y.shape[2] - 1, y.shape[3] - 1
        carry = y[:, :, pairs:].clone()  # one row, not a view holding all of ``y``
        if pairs == 0:
            continue
        out = y.new_empty(y.shape[0], out_ch, 2 * pairs, 2 * width)
        for p in (0, 1):
            for q in (0, 1):
                block = (2 * p + q) * out_ch
                out[:, :, p::2, q::2] = y[:, block : block + out_ch, p : p + pairs, q : q + width]
        del y
        yield out
        del out


class Trail:
    """Passes a stream on and keeps its recent stripes, so that rows ``[a, b)`` can be read a little behind its
    front (a resnet's residual, added a few rows after its input went by); :meth:`rows` drops what is above ``a``."""

    def __init__(self, stripes: Stripes) -> None:
        self._stripes = stripes
        self._kept: deque[tuple[int, torch.Tensor]] = deque()
        self._end = 0

    def __iter__(self) -> Stripes:
        for stripe in self._stripes:
            self._kept.append((self._end, stripe))
            self._end += stripe.shape[2]
            yield stripe

    def rows(self, a: int, b: int) -> torch.Tensor:
        while self._kept and self._kept[0][0] + self._kept[0][1].shape[2] <= a:
            self._kept.popleft()
        if b > self._end or not self._kept or self._kept[0][0] > a:
            raise RuntimeError(f"rows [{a}, {b}) are not kept (have up to {self._end})")  # a bug, not input
        parts = [t[:, :, max(a - s, 0) : b - s] for s, t in self._kept if s < b]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def write_rows(
    stripes: Stripes,
    out: torch.Tensor,
    residual: Callable[[int, int], torch.Tensor] | None = None,
    divisor: float = 1.0,
    moments: Moments | None = None,
) -> torch.Tensor:
    """``out = (residual + stream) / divisor`` written stripe by stripe; ``residual(a, b)`` is read before rows
    ``[a, b)`` are written, so it may read ``out`` itself. ``moments`` gathers the statistics of what is written
    (for the norm that reads ``out`` next: no separate read pass)."""
    r0 = 0
    for y in stripes:  # a fresh tensor: updated in place
        r1 = r0 + y.shape[2]
        if residual is not None:
            y += residual(r0, r1)
            if divisor != 1.0:
                y /= divisor
        out[:, :, r0:r1] = y
        if moments is not None:
            moments.add(y)
        del y  # freed before the next stripe is computed
        r0 = r1
    if r0 != out.shape[2]:
        raise RuntimeError(f"a stream wrote {r0} of {out.shape[2]} rows")  # a bug, not input
    return out


def _rows_for(channels: int, width: int, tile_pixels: int) -> int:
    """Stripe height holding about ``tile_pixels × STRIPE_CHANNELS`` elements: fewer rows for wider layers."""
    return max(1, tile_pixels * STRIPE_CHANNELS // max(1, channels * width))


class Source:
    """A resnet's input, read in stripes: a stored tensor, or a stored tensor's upsampler output (recomputed on
    every read, never stored)."""

    def __init__(self, stored: torch.Tensor, upsampler: nn.Module | None = None) -> None:
        self.stored, self.upsampler = stored, upsampler
        exact_dtype = upsampler is not None and upsampler.conv.weight.dtype in SUBPIXEL_DTYPES
        self._phases = subpixel_kernels(upsampler.conv.weight) if exact_dtype else None  # once, for every sweep
        b, c, h, w = stored.shape
        scale = 1 if upsampler is None else 2
        self.shape = (b, c if upsampler is None else upsampler.conv.out_channels, h * scale, w * scale)

    def stripes(self, channels: int, tile_pixels: int) -> Stripes:
        """Stripes of this tensor, sized for a sweep whose widest tensor has ``channels`` channels."""
        rows = _rows_for(max(channels, self.shape[1]), self.shape[3], tile_pixels)
        if self.upsampler is None:
            return stripes_of(self.stored, rows)
        return upsampled_conv(self.upsampler.conv, stripes_of(self.stored, max(1, rows // 2)), self._phases)


def _resnet(
    block: nn.Module,
    x: Source,
    tile_pixels: int,
    *,
    keep_mid: bool,
    stats1: tuple[torch.Tensor, torch.Tensor] | None = None,
    next_norm: nn.GroupNorm | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """diffusers ``ResnetBlock2D`` (no temb, no resampling): ``(shortcut(x) + conv2(h(conv1(h(x))))) / s``.

    Sweeps: the statistics of ``x`` (a read, or a recomputation of an upsampler output); conv1 → ``mid``
    stored (``keep_mid``), or conv1 for ``mid``'s statistics only; conv2 over the stored ``mid``, or
    conv1 → conv2 in one sweep. The output goes into ``x``'s own storage when ``x`` is stored and the shapes
    match; otherwise into a new tensor that, for an upsampled ``x`` with a stored ``mid``, holds the
    shortcut first (taken during the conv1 sweep, since ``x`` is not read again).

    ``stats1``: ``x``'s statistics for ``norm1`` when known (gathered as ``x`` was written). Returns the output
    and, given ``next_norm``, its statistics for that norm, gathered as the output is written.
    """
    act = block.nonlinearity
    c_mid, c_out = block.conv1.out_channels, block.conv2.out_channels
    widest = max(x.shape[1], c_mid, c_out)
    shortcut = block.conv_shortcut if block.conv_shortcut is not None else (lambda t: t)
    stats1 = stats1 or group_stats(x.stripes(widest, tile_pixels), block.norm1)
    after = None if next_norm is None else Moments(next_norm.num_groups, next_norm.eps)

    def mid_of(stripes: Stripes) -> Stripes:
        return convolved(block.conv1.weight, block.conv1.bias, normed(stripes, block.norm1, stats1, act))

    def out_of(mid: Stripes) -> Stripes:
        return convolved(block.conv2.weight, block.conv2.bias, normed(mid, block.norm2, stats2, act))

    in_place = x.upsampler is None and block.conv_shortcut is None and c_out == x.shape[1]
    out = x.stored if in_place else x.stored.new_empty(x.shape[0], c_out, *x.shape[2:])
    if keep_mid:
        mid = x.stored.new_empty(x.shape[0], c_mid, *x.shape[2:])
        moments = Moments(block.norm2.num_groups, block.norm2.eps)
        if x.upsampler is not None:
            conv1 = mid_of(_also_written(x.stripes(widest, tile_pixels), out, shortcut))
        else:
            rows = _rows_for(widest, x.shape[3], tile_pixels)
            conv1 = convolved_stored(block.conv1, x.stored, rows, lambda t: _prepared(t, block.norm1, stats1, act))
        write_rows(conv1, mid, moments=moments)
        stats2 = moments.stats()
        if x.upsampler is not None:
            residual = lambda a, b: out[:, :, a:b]  # noqa: E731  (holds the shortcut already)
        else:
            residual = lambda a, b: shortcut(x.stored[:, :, a:b])  # noqa: E731
        mid_rows = _rows_for(widest, mid.shape[3], tile_pixels)
        conv2 = convolved_stored(block.conv2, mid, mid_rows, lambda t: _prepared(t, block.norm2, stats2, act))
        write_rows(conv2, out, residual, block.output_scale_factor, after)
        return out, after and after.stats()
    stats2 = group_stats(mid_of(x.stripes(widest, tile_pixels)), block.norm2)
    trail = Trail(x.stripes(widest, tile_pixels))
    residual = lambda a, b: shortcut(trail.rows(a, b))  # noqa: E731
    write_rows(out_of(mid_of(iter(trail))), out, residual, block.output_scale_factor, after)
    return out, after and after.stats()


def _also_written(stripes: Stripes, out: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stripes:
    """Passes ``stripes`` on, writing ``fn`` of each into the same rows of ``out`` on the way."""
    r0 = 0
    for stripe in stripes:
        out[:, :, r0 : r0 + stripe.shape[2]] = fn(stripe)
        r0 += stripe.shape[2]
        yield stripe
        del stripe


@torch.no_grad()
def streamed_decode(
    decoder: nn.Module,
    z: torch.Tensor,
    *,
    stride: int,
    tile_pixels: int = 1 << 19,
    conv_out_padding: Padding = SAME,
    store_bytes: int = STORE_BYTES,
) -> torch.Tensor:
    """Decode ``z [B, C_lat, h, w]`` → ``[B, 3, h·f, w·f]`` with a diffusers VAE ``Decoder``.

    ``stride`` 2 means the decoder's head is norm → nearest×2 → SiLU → conv_out (the F16 VAE).
    ``tile_pixels`` bounds each stripe to about ``tile_pixels × 32`` elements (rows shrink as layers widen).
    ``store_bytes``: a resnet's inner activation (conv1's output) up to this size is stored, a larger one is
    recomputed (two conv1 sweeps instead of one).
    """
    if stride not in (1, 2):
        raise ValueError(f"streamed decode supports VAE stride 1 or 2, got {stride}")
    sample: torch.Tensor = decoder.mid_block(decoder.conv_in(z))
    pending: nn.Module | None = None  # an upsampler whose output the next resnet streams from ``sample``
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # ``sample``'s, for the norm that reads it next
    steps = [(m, r) for b in decoder.up_blocks
             for m, r in [*((m, True) for m in b.resnets), *((m, False) for m in b.upsamplers or ())]]  # fmt: skip
    for step, (module, is_resnet) in enumerate(steps):
        if is_resnet:
            after = steps[step + 1][0] if step + 1 < len(steps) else None
            next_norm = decoder.conv_norm_out if after is None else getattr(after, "norm1", None)
            source = Source(sample, pending)
            mid_bytes = source.shape[0] * module.conv1.out_channels * source.shape[2] * source.shape[3]
            keep_mid = mid_bytes * sample.element_size() <= store_bytes
            sample, stats = _resnet(module, source, tile_pixels, keep_mid=keep_mid, stats1=stats, next_norm=next_norm)
            pending = None
        else:
            if pending is not None:
                raise ValueError("two upsamplers in a row are not a diffusers decoder layout")
            pending, stats = module, None
    if pending is not None:  # a decoder ending on an upsampler (not Flux's layout): store its output
        source = Source(sample, pending)
        out = sample.new_empty(*source.shape)
        sample = write_rows(source.stripes(source.shape[1], tile_pixels), out)
    norm, act = decoder.conv_norm_out, nn.SiLU()
    width = sample.shape[3] * stride
    stats = stats or group_stats(stripes_of(sample, _rows_for(sample.shape[1], sample.shape[3], tile_pixels)), norm)
    left, right, top, bottom = conv_out_padding
    height = sample.shape[2] * stride
    out = sample.new_empty(sample.shape[0], decoder.conv_out.out_channels, height + top + bottom - 2,
                           width + left + right - 2)  # fmt: skip
    rows = max(1, _rows_for(sample.shape[1], width, tile_pixels) // stride)
    head = normed(stripes_of(sample, rows), norm, stats, act)
    if stride == 2:
        head = upsampled(head)
    return write_rows(convolved(decoder.conv_out.weight, decoder.conv_out.bias, head, conv_out_padding), out)
