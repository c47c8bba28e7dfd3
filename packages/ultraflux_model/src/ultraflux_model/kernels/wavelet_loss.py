"""Fused SNR-aware Huber wavelet loss: kernel, launcher, autograd.Function and the public function.

One pass over ``pred_x0`` and ``target_x0`` computes the one-level Haar DWT of the residual, the
pseudo-Huber of each of the four sub-bands and per-tile partial sums; the backward recomputes the
residual from the saved inputs and writes ``∂loss/∂pred_x0`` in one pass (no ``[B, 4C, H/2, W/2]``
intermediate is ever stored). The math and the per-sample ω(t), c(t) are those of
:func:`ultraflux_model.diffusion.losses.snr_huber_wavelet_loss`; ω and c are cheap ``[B]`` torch ops and
reach the kernel as pointers, so nothing synchronises with the host.

Because the Haar transform is linear, ``W(p) - W(q) = W(p - q)``: the kernel transforms the pixel
difference. It is orthonormal, so the gradient of the pixels is the transpose (= inverse) Haar of the
gradient of the sub-bands. ``target_x0`` gets the exact negative of ``pred_x0``'s gradient when it
requires one (it normally does not: it is data).

Partial sums go to a ``[B·C, tiles]`` buffer reduced in torch (deterministic, unlike atomics).
On CPU tensors the kernel runs only when ``TRITON_INTERPRET=1`` is set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ultraflux_model.diffusion.losses import check_loss_inputs, snr_weights
from ultraflux_model.errors import UltraFluxError
from ultraflux_model.kernels.launch import check_launchable

_TILE_W = 64  # output (half-resolution) columns per program: 128 contiguous input pixels per row
_TILE_ELEMENTS = 1024  # output positions per program (each reads 2x2 pixels of two tensors)


@triton.jit
def _wavelet_huber_kernel(
    pred_ptr,
    target_ptr,
    c_ptr,
    coef_ptr,
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
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid ``(B·C, cdiv(H/2, BLOCK_H), cdiv(W/2, BLOCK_W))``.

    Forward: ``out[plane, tile]`` = Σ over the tile's 4 sub-bands of c²(√(1+(R/c)²)-1).
    Backward: ``out`` is the contiguous ``[B, C, H, W]`` gradient, ``coef[b]`` = ∂loss/∂Σ_b.
    """
    plane = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    batch = plane // channels
    channel = plane % channels

    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    mask = (rows < out_h) & (cols < out_w)

    p = pred_ptr + batch.to(tl.int64) * stride_pb + channel.to(tl.int64) * stride_pc
    t = target_ptr + batch.to(tl.int64) * stride_tb + channel.to(tl.int64) * stride_tc
    p_top = p + (2 * rows).to(tl.int64) * stride_ph + (2 * cols) * stride_pw
    t_top = t + (2 * rows).to(tl.int64) * stride_th + (2 * cols) * stride_tw
    # Pixel residuals of each 2x2 block: a b / c d (masked lanes read 0, so they add 0 to the sum).
    ea = tl.load(p_top, mask=mask, other=0.0).to(ACC) - tl.load(t_top, mask=mask, other=0.0).to(ACC)
    eb = tl.load(p_top + stride_pw, mask=mask, other=0.0).to(ACC) - tl.load(
        t_top + stride_tw, mask=mask, other=0.0
    ).to(ACC)
    ec = tl.load(p_top + stride_ph, mask=mask, other=0.0).to(ACC) - tl.load(
        t_top + stride_th, mask=mask, other=0.0
    ).to(ACC)
    ed = tl.load(p_top + stride_ph + stride_pw, mask=mask, other=0.0).to(ACC) - tl.load(
        t_top + stride_th + stride_tw, mask=mask, other=0.0
    ).to(ACC)
    # Orthonormal Haar, pywt's sub-bands: cA, cH (rows differ), cV (columns differ), cD.
    r_a = (ea + eb + ec + ed) * 0.5
    r_h = (ea + eb - ec - ed) * 0.5
    r_v = (ea - eb + ec - ed) * 0.5
    r_d = (ea - eb - ec + ed) * 0.5

    inv_c = 1.0 / tl.load(c_ptr + batch).to(ACC)
    # s = √(1+(R/c)²): the loss is R²/(s+1) (= c²(s-1) without float32 cancellation), its derivative R/s.
    s_a = tl.sqrt(1.0 + (r_a * inv_c) * (r_a * inv_c))
    s_h = tl.sqrt(1.0 + (r_h * inv_c) * (r_h * inv_c))
    s_v = tl.sqrt(1.0 + (r_v * inv_c) * (r_v * inv_c))
    s_d = tl.sqrt(1.0 + (r_d * inv_c) * (r_d * inv_c))
    if BACKWARD:
        coef = tl.load(coef_ptr + batch).to(ACC)
        g_a = coef * r_a / s_a
        g_h = coef * r_h / s_h
        g_v = coef * r_v / s_v
        g_d = coef * r_d / s_d
        # Transpose of the Haar matrix (it is orthonormal and symmetric up to the sub-band order).
        width = 2 * out_w
        g = out_ptr + plane.to(tl.int64) * (2 * out_h) * width + (2 * rows).to(tl.int64) * width + 2 * cols
        dtype = out_ptr.dtype.element_ty
        tl.store(g, ((g_a + g_h + g_v + g_d) * 0.5).to(dtype), mask=mask)
        tl.store(g + 1, ((g_a + g_h - g_v - g_d) * 0.5).to(dtype), mask=mask)
        tl.store(g + width, ((g_a - g_h + g_v - g_d) * 0.5).to(dtype), mask=mask)
        tl.store(g + width + 1, ((g_a - g_h - g_v + g_d) * 0.5).to(dtype), mask=mask)
    else:
        huber = r_a * r_a / (s_a + 1.0) + r_h * r_h / (s_h + 1.0) + r_v * r_v / (s_v + 1.0) + r_d * r_d / (s_d + 1.0)
        tile = pid_h * tl.num_programs(2) + pid_w
        tl.store(out_ptr + plane * tl.num_programs(1) * tl.num_programs(2) + tile, tl.sum(tl.sum(huber, 1), 0))


def _compute_dtype(pred: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """float32 accumulation for 16/32-bit inputs, float64 when either input is float64 (as the reference)."""
    return torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)


def _launch(
    pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor, coef: torch.Tensor | None
) -> torch.Tensor:
    """Forward (``coef is None``): ``[B, tiles·C]`` partial sums. Backward: the gradient of ``pred``."""
    check_launchable(_wavelet_huber_kernel, pred, target, c)
    batch, channels, height, width = pred.shape
    out_h, out_w = height // 2, width // 2
    block_w = min(triton.next_power_of_2(out_w), _TILE_W)
    block_h = min(triton.next_power_of_2(out_h), max(1, _TILE_ELEMENTS // block_w))
    grid = (batch * channels, triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w))
    compute = _compute_dtype(pred, target)
    if coef is None:
        out = torch.empty(batch, channels * grid[1] * grid[2], device=pred.device, dtype=compute)
    else:
        out = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)  # contiguous: the kernel's layout
    _wavelet_huber_kernel[grid](
        pred, target, c, c if coef is None else coef, out,
        channels, out_h, out_w,
        *pred.stride(), *target.stride(),
        BLOCK_H=block_h, BLOCK_W=block_w, BACKWARD=coef is not None,
        ACC=tl.float64 if compute == torch.float64 else tl.float32,
        num_warps=4,
    )  # fmt: skip
    return out


class _SnrHuberWaveletLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN001
        ctx, pred: torch.Tensor, target: torch.Tensor, omega: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        partials = _launch(pred, target, c, coef=None)
        # loss = mean_b ω_b · (Σ_b / n) with n = C·H·W elements per sample (4 sub-bands of C·H/2·W/2).
        scale = 1.0 / (pred.shape[0] * pred[0].numel())
        ctx.save_for_backward(pred, target, omega, c)
        ctx.scale = scale
        return (omega * partials.sum(dim=1)).sum() * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        pred, target, omega, c = ctx.saved_tensors
        coef = grad_loss * omega * ctx.scale  # [B] on the device: no host sync
        grad_pred = _launch(pred, target, c, coef=coef)
        grad_target = (-grad_pred).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None


def snr_huber_wavelet_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    t: torch.Tensor,
    *,
    gamma: float = 5.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    c_min: float = 0.2,
    c_max: float = 1.0,
    t_clamp: float = 1e-3,
) -> torch.Tensor:
    """Fused twin of :func:`ultraflux_model.diffusion.losses.snr_huber_wavelet_loss` (same arguments, same value).

    Args:
        pred_x0, target_x0: ``[B, C, H, W]`` (even H, W), any strides, float16/bfloat16/float32/float64.
        t: ``[B]`` times on the same device.
    Returns:
        Scalar loss in float32 (float64 for float64 inputs); differentiable w.r.t. ``pred_x0`` (and ``target_x0``).
    """
    check_loss_inputs(pred_x0, target_x0, t)
    if pred_x0.numel() == 0:
        raise UltraFluxError("snr_huber_wavelet_loss got an empty batch")
    compute = _compute_dtype(pred_x0, target_x0)
    omega, c = snr_weights(
        t.to(compute), gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp
    )
    return _SnrHuberWaveletLoss.apply(pred_x0, target_x0, omega.contiguous(), c.contiguous())
