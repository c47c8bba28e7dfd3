"""Fused SNR-aware Huber wavelet loss: kernel, launcher, autograd.Function and the public function.

One pass over ``pred_x0`` and ``target_x0`` computes the one-level Haar DWT of the residual, the
pseudo-Huber of each of the four sub-bands (times its band weight) and ω-weighted per-tile partial sums; the
backward recomputes the residual from the saved inputs and writes ``∂loss/∂pred_x0`` in one pass (no
``[B, 4C, H/2, W/2]`` intermediate is ever stored). The math is that of
:func:`ultraflux_model.diffusion.losses.snr_huber_wavelet_loss`. The per-sample ω(t), c(t) are computed
inside the kernel from ``t``: as separate torch ops on ``[B]`` they would be a dozen launches, more than
the fused loss itself at training sizes. Nothing synchronises with the host.

Because the Haar transform is linear, ``W(p) - W(q) = W(p - q)``: the kernel transforms the pixel
difference. It is orthonormal, so the gradient of the pixels is the transpose (= inverse) Haar of the
gradient of the sub-bands. ``target_x0`` gets the exact negative of ``pred_x0``'s gradient when it
requires one (it normally does not: it is data).

Partial sums go to a one-per-program buffer summed in torch (deterministic, unlike atomics).
On CPU tensors the kernel runs only when ``TRITON_INTERPRET=1`` is set before this module is imported.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.kernels.checks import check_band_weights, check_loss_inputs, check_loss_params
from ultraflux_model.kernels.launch import check_launchable

# (output columns, output positions) per program by device type. On CUDA: 64 half-resolution columns
# (128 contiguous input pixels per row) x 16 rows; each position reads 2x2 pixels of two tensors.
# Triton's interpreter (CPU tensors) runs programs one after another at a fixed cost of milliseconds each,
# so there one program takes a whole plane of typical latent sizes. Tests swap in the CUDA tiling.
_TILING = {"cuda": (64, 1024), "cpu": (512, 65536)}


@triton.jit
def _snr_weights(t, gamma, alpha, beta, c_min, c_max, t_clamp):
    """ω(t) and c(t) of docs/design.md §3 for one sample (x^p written as 2^(p·log2 x): plain tl ops, no libdevice)."""
    t = tl.minimum(tl.maximum(t, t_clamp), 1.0 - t_clamp)
    capped = tl.minimum((1.0 - t) * (1.0 - t) / (t * t), gamma)  # min(SNR, γ) > 0
    omega = t / (1.0 - t) * tl.exp2(beta * tl.log2(capped))
    c = c_min + (c_max - c_min) * tl.exp2(alpha * tl.log2(capped / gamma))
    return omega, c


@triton.jit
def _wavelet_huber_kernel(
    pred_ptr,
    target_ptr,
    t_ptr,
    grad_loss_ptr,
    out_ptr,
    channels,
    out_h,
    out_w,
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    stride_tb,
    stride_tc,
    stride_th,
    stride_tw,
    scale,
    gamma,
    alpha,
    beta,
    c_min,
    c_max,
    t_clamp,
    w_ll,
    w_lh,
    w_hl,
    w_hh,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid ``(B·C, cdiv(H/2, BLOCK_H), cdiv(W/2, BLOCK_W))``; ``scale`` = 1 / (B·C·H·W).

    Forward: ``out[program]`` = ω_b · scale · Σ over the tile's 4 sub-bands k of w_k·c_b²(√(1+(R/c_b)²)-1), so the
    loss is ``out.sum()``. Backward: ``out`` is the contiguous ``[B, C, H, W]`` gradient of ``pred``, given
    the upstream gradient at ``grad_loss_ptr``.
    """
    plane = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    batch = plane // channels
    channel = plane % channels

    # Output rows, and the 2·BLOCK_W contiguous input columns they cover: rows load whole (coalesced),
    # then even/odd columns are split apart in registers.
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = pid_w * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)[None, :]
    mask = (rows < out_h) & (cols < 2 * out_w)

    p = pred_ptr + batch.to(tl.int64) * stride_pb + channel.to(tl.int64) * stride_pc
    t = target_ptr + batch.to(tl.int64) * stride_tb + channel.to(tl.int64) * stride_tc
    p_top = p + (2 * rows).to(tl.int64) * stride_ph + cols * stride_pw
    t_top = t + (2 * rows).to(tl.int64) * stride_th + cols * stride_tw
    # Pixel residuals of each 2x2 block: a b / c d (masked lanes read 0, so they add 0 to the sum).
    e_top = tl.load(p_top, mask=mask, other=0.0).to(ACC) - tl.load(t_top, mask=mask, other=0.0).to(ACC)
    e_bottom = tl.load(p_top + stride_ph, mask=mask, other=0.0).to(ACC) - tl.load(
        t_top + stride_th, mask=mask, other=0.0
    ).to(ACC)
    ea, eb = tl.split(tl.reshape(e_top, (BLOCK_H, BLOCK_W, 2)))
    ec, ed = tl.split(tl.reshape(e_bottom, (BLOCK_H, BLOCK_W, 2)))
    # Orthonormal Haar, pywt's sub-bands: cA, cH (rows differ), cV (columns differ), cD.
    r_a = (ea + eb + ec + ed) * 0.5
    r_h = (ea + eb - ec - ed) * 0.5
    r_v = (ea - eb + ec - ed) * 0.5
    r_d = (ea - eb - ec + ed) * 0.5

    # Weights in float32 whatever ACC is: the hyper-parameters are float32 scalars anyway, and float64
    # exp2/log2 are not plain instructions on every GPU.
    omega, c = _snr_weights(tl.load(t_ptr + batch).to(tl.float32), gamma, alpha, beta, c_min, c_max, t_clamp)
    omega = omega.to(ACC)
    inv_c = 1.0 / c.to(ACC)
    # s = √(1+(R/c)²): the loss is R²/(s+1) (= c²(s-1) without float32 cancellation), its derivative R/s.
    s_a = tl.sqrt(1.0 + (r_a * inv_c) * (r_a * inv_c))
    s_h = tl.sqrt(1.0 + (r_h * inv_c) * (r_h * inv_c))
    s_v = tl.sqrt(1.0 + (r_v * inv_c) * (r_v * inv_c))
    s_d = tl.sqrt(1.0 + (r_d * inv_c) * (r_d * inv_c))
    if BACKWARD:
        coef = tl.load(grad_loss_ptr).to(ACC) * omega * scale
        g_a = coef * w_ll * r_a / s_a
        g_h = coef * w_lh * r_h / s_h
        g_v = coef * w_hl * r_v / s_v
        g_d = coef * w_hh * r_d / s_d
        # Transpose of the Haar matrix (it is orthonormal and symmetric up to the sub-band order).
        g_top = tl.join((g_a + g_h + g_v + g_d) * 0.5, (g_a + g_h - g_v - g_d) * 0.5)  # a, b
        g_bottom = tl.join((g_a - g_h + g_v - g_d) * 0.5, (g_a - g_h - g_v + g_d) * 0.5)  # c, d
        width = 2 * out_w
        g = out_ptr + plane.to(tl.int64) * (2 * out_h) * width + (2 * rows).to(tl.int64) * width + cols
        dtype = out_ptr.dtype.element_ty
        tl.store(g, tl.reshape(g_top, (BLOCK_H, 2 * BLOCK_W)).to(dtype), mask=mask)
        tl.store(g + width, tl.reshape(g_bottom, (BLOCK_H, 2 * BLOCK_W)).to(dtype), mask=mask)
    else:
        huber = (
            w_ll * (r_a * r_a / (s_a + 1.0))
            + w_lh * (r_h * r_h / (s_h + 1.0))
            + w_hl * (r_v * r_v / (s_v + 1.0))
            + w_hh * (r_d * r_d / (s_d + 1.0))
        )
        program = (plane * tl.num_programs(1) + pid_h) * tl.num_programs(2) + pid_w
        # tl.sum is tl.reduce with _sum_combine; spelled out because tl.sum is itself a @triton.jit function,
        # which the interpreter cannot call when Triton was imported before TRITON_INTERPRET=1 was set,
        # while it sums with numpy whenever the combine function is this one.
        total = tl.reduce(huber, None, tl.standard._sum_combine)
        tl.store(out_ptr + program, total * omega * scale)


def _compute_dtype(pred: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """float32 accumulation for 16/32-bit inputs, float64 when either input is float64 (as the reference)."""
    return torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)


def _launch(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, params: dict[str, Any], grad_loss: torch.Tensor | None
) -> torch.Tensor:
    """Forward (``grad_loss is None``): per-program weighted partial sums. Backward: the gradient of ``pred``."""
    check_launchable(_wavelet_huber_kernel, pred, target, t)
    batch, channels, height, width = pred.shape
    out_h, out_w = height // 2, width // 2
    tile_w, tile = _TILING[pred.device.type]
    block_w = min(triton.next_power_of_2(out_w), tile_w)
    block_h = min(triton.next_power_of_2(out_h), max(1, tile // block_w))
    grid = (batch * channels, triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w))
    compute = _compute_dtype(pred, target)
    if grad_loss is None:
        out = torch.empty(grid[0] * grid[1] * grid[2], device=pred.device, dtype=compute)
    else:
        out = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)  # contiguous: the kernel's layout
    _wavelet_huber_kernel[grid](
        pred, target, t, t if grad_loss is None else grad_loss, out,
        channels, out_h, out_w,
        *pred.stride(), *target.stride(),
        1.0 / pred.numel(), params["gamma"], params["alpha"], params["beta"],
        params["c_min"], params["c_max"], params["t_clamp"], *params["band_weights"],
        BLOCK_H=block_h, BLOCK_W=block_w, BACKWARD=grad_loss is not None,
        ACC=tl.float64 if compute == torch.float64 else tl.float32,
        num_warps=4,
    )  # fmt: skip
    return out


class _SnrHuberWaveletLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN001
        ctx, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        ctx.save_for_backward(pred, target, t)
        ctx.params = params
        # Each program's partial is already weighted by ω_b / (B·C·H·W): the loss is their sum.
        return _launch(pred, target, t, params, grad_loss=None).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        pred, target, t = ctx.saved_tensors
        grad_pred = _launch(pred, target, t, ctx.params, grad_loss=grad_loss.contiguous())
        grad_target = (-grad_pred).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None


def snr_huber_wavelet_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    t: torch.Tensor,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    c_min: float,
    c_max: float,
    t_clamp: float,
    band_weights: tuple[float, float, float, float],
) -> torch.Tensor:
    """Fused twin of :func:`ultraflux_model.diffusion.losses.snr_huber_wavelet_loss` (same arguments, same value).

    Args:
        pred_x0, target_x0: ``[B, C, H, W]`` (even H, W), any strides, float16/bfloat16/float32/float64.
        t: ``[B]`` times on the same device.
    Returns:
        Scalar loss in float32 (float64 for float64 inputs); differentiable w.r.t. ``pred_x0`` (and ``target_x0``).
        The hyper-parameters enter the kernel as float32 scalars, so float64 inputs agree with the
        reference to float32 precision in ω and c.
    """
    check_loss_inputs(pred_x0, target_x0, t)
    if pred_x0.numel() == 0:
        raise UltraFluxError("snr_huber_wavelet_loss got an empty batch")
    params: dict[str, Any] = dict(gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp)
    check_loss_params(**params)
    params["band_weights"] = check_band_weights(band_weights)
    return _SnrHuberWaveletLoss.apply(pred_x0, target_x0, t.contiguous(), params)
