"""Fused RoPE application: kernel, launcher, autograd.Function and :func:`apply_rope`.

Same numerics as diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)``:
pairs are interleaved (``x[..., 2i]``, ``x[..., 2i+1]``), the rotation is computed in float32 and cast
back to ``x.dtype``::

    out[2i]   = x[2i]   · cos[2i]   - x[2i+1] · sin[2i]
    out[2i+1] = x[2i+1] · cos[2i+1] + x[2i]   · sin[2i+1]

Its transpose (the backward) is the same formula with ``(sin[2i], sin[2i+1])`` replaced by
``(-sin[2i+1], -sin[2i])``, so one kernel does both directions. One program rotates a block of
sequence positions for a few heads: the cos/sin block is loaded once and reused across those heads.

On CPU tensors the kernel runs only when ``TRITON_INTERPRET=1`` is set before this module is imported
(that is how CI tests it); :mod:`ultraflux_model.kernels.dispatch` decides when to call it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.kernels.launch import check_launchable

# (elements of x per head per program, heads per program) by device type. On CUDA: 16 rows of D=128 per
# head, 4 heads sharing one cos/sin block (24 heads -> 6 groups per sequence block). Triton's interpreter
# (CPU tensors) runs programs one after another at a fixed cost of milliseconds each, so there one program
# takes as much as fits comfortably in memory. Tests swap in the CUDA tiling to cover multi-program grids.
_TILING = {"cuda": (2048, 4), "cpu": (65536, 1 << 16)}


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_heads,
    head_groups,
    seq_len,
    head_dim,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_cs,
    stride_cd,
    stride_ss,
    stride_sd,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEADS: tl.constexpr,
    TRANSPOSE: tl.constexpr,
):
    """Grid ``(B * cdiv(H, HEADS), cdiv(S, BLOCK_S))``; head groups vary fastest so neighbours share cos/sin in L2."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    batch = pid_bh // head_groups
    head0 = (pid_bh % head_groups) * HEADS

    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    tile_mask = (rows < seq_len) & (cols < head_dim)

    # float32 like diffusers (and the interpreter computes bf16 arithmetic wrongly without the upcast).
    cos = tl.load(cos_ptr + rows * stride_cs + cols * stride_cd, mask=tile_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + rows * stride_ss + cols * stride_sd, mask=tile_mask, other=0.0).to(tl.float32)
    cos_even, cos_odd = tl.split(tl.reshape(cos, (BLOCK_S, BLOCK_D // 2, 2)))
    sin_even, sin_odd = tl.split(tl.reshape(sin, (BLOCK_S, BLOCK_D // 2, 2)))
    if TRANSPOSE:
        sin_even, sin_odd = -sin_odd, -sin_even

    x_base = x_ptr + batch.to(tl.int64) * stride_xb + rows.to(tl.int64) * stride_xs + cols * stride_xd
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + rows.to(tl.int64) * stride_os + cols * stride_od
    for i in range(HEADS):
        head = (head0 + i).to(tl.int64)
        mask = tile_mask & (head < num_heads)
        x = tl.load(x_base + head * stride_xh, mask=mask, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_D // 2, 2)))
        out_even = x_even * cos_even - x_odd * sin_even
        out_odd = x_odd * cos_odd + x_even * sin_odd
        out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_S, BLOCK_D))
        tl.store(out_base + head * stride_oh, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Rotate ``x [B, H, S, D]`` (any strides) into a new tensor with ``x``'s layout and dtype."""
    check_launchable(_rope_kernel, x, cos, sin)
    batch, heads, seq, dim = x.shape
    out = torch.empty_like(x)  # keeps x's strides, so a transposed view comes back transposed
    if out.numel() == 0:
        return out
    tile, heads_per_program = _TILING[x.device.type]
    block_d = triton.next_power_of_2(dim)
    block_s = min(triton.next_power_of_2(seq), max(1, tile // block_d))
    group = min(heads_per_program, heads)
    head_groups = triton.cdiv(heads, group)
    grid = (batch * head_groups, triton.cdiv(seq, block_s))
    _rope_kernel[grid](
        x, cos, sin, out,
        heads, head_groups, seq, dim,
        *x.stride(), *out.stride(), *cos.stride(), *sin.stride(),
        BLOCK_S=block_s, BLOCK_D=block_d, HEADS=group, TRANSPOSE=transpose,
        num_warps=4,
    )  # fmt: skip
    return out


class _ApplyRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        cos, sin = ctx.saved_tensors
        return _launch(grad_out, cos, sin, transpose=True), None, None


def _check_rope_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise UltraFluxError(f"apply_rope expects x as [B, H, S, D], got shape {tuple(x.shape)}")
    seq, dim = x.shape[2], x.shape[3]
    if dim % 2:
        raise UltraFluxError(f"RoPE rotates pairs of channels: head dim D must be even, got {dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (seq, dim):
            raise UltraFluxError(f"{name} must be [S, D] = [{seq}, {dim}] to match x, got {tuple(table.shape)}")
    if not x.is_floating_point():
        raise UltraFluxError(f"apply_rope needs a floating-point x, got {x.dtype}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise UltraFluxError(
            "the fused RoPE does not differentiate through cos/sin (they are position tables); "
            "detach them or use the eager path"
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused interleaved-pair RoPE, forward and backward.

    Args:
        x: ``[B, H, S, D]`` queries or keys, any strides (e.g. a ``transpose(1, 2)`` view of ``[B, S, H, D]``),
            float32/bfloat16/float16 (float64 is accepted and, like diffusers, rotated in float32).
        cos, sin: ``[S, D]`` tables, interleaved (``cos[:, 2i] == cos[:, 2i+1]`` for real RoPE tables).
    Returns:
        ``[B, H, S, D]`` with ``x``'s dtype and strides; differentiable w.r.t. ``x``.
    """
    _check_rope_inputs(x, cos, sin)
    return _ApplyRope.apply(x, cos, sin)
