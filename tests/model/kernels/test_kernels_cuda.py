"""The compiled (non-interpreted) Triton kernels on a CUDA device, at the benchmark shapes (skipped without CUDA).

The interpreter tests set TRITON_INTERPRET=1 in the pytest process, so these checks run in a fresh
interpreter without it, where ``@triton.jit`` compiles for the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from diffusers.models.embeddings import apply_rotary_emb
    from ultraflux_model.diffusion.losses import snr_huber_wavelet_loss as reference
    from ultraflux_model.kernels.rope import apply_rope
    from ultraflux_model.kernels.wavelet_loss import snr_huber_wavelet_loss as fused
    from ultraflux_model.config import LossConfig

    device = torch.device(sys.argv[1])
    big = sys.argv[2] == "big"
    gen = torch.Generator(device).manual_seed(0)
    rope_shapes = [(2, 24, 4608, 128), (1, 3, 1000, 64)] if big else [(2, 3, 37, 128)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, s, d in rope_shapes:
            x = torch.randn(b, s, h, d, generator=gen, device=device).to(dtype).transpose(1, 2).requires_grad_(True)
            ang = (torch.rand(s, d // 2, generator=gen, device=device) * 50).repeat_interleave(2, -1)
            cos, sin = ang.cos(), ang.sin()
            grad = torch.randn(x.shape, generator=gen, device=device).to(dtype)
            out = apply_rope(x, cos, sin)
            (gx,) = torch.autograd.grad(out, x, grad)
            xe = x.detach().clone().requires_grad_(True)
            ref = apply_rotary_emb(xe, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)
            (ge,) = torch.autograd.grad(ref, xe, grad)
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(out, ref, **tol)
            torch.testing.assert_close(gx, ge, **tol)
            assert out.stride() == x.stride()
    loss_shapes = [(8, 16, 128, 128), (1, 16, 256, 256), (3, 5, 34, 134)] if big else [(3, 5, 34, 134)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in loss_shapes:
            p = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
            q = torch.randn(shape, generator=gen, device=device).to(dtype)
            t = torch.rand(shape[0], generator=gen, device=device)
            t[0] = 0.0
            loss = fused(p, q, t, **LossConfig().model_dump())
            (gp,) = torch.autograd.grad(loss, p)
            pr = p.detach().clone().requires_grad_(True)
            ref = reference(pr, q, t, **LossConfig().model_dump())
            (gr,) = torch.autograd.grad(ref, pr)
            torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0.0)
            tol = dict(rtol=1e-4, atol=1e-9) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-8)
            torch.testing.assert_close(gp, gr, **tol)
    print("ok")
    """
)


# Compiles both kernels, both directions, for an H100/H200 (sm_90) with Triton's bundled ptxas; no GPU needed.
# Arguments are typed as the JIT would specialise them for contiguous bf16 tensors (16-byte aligned pointers,
# unit inner stride, other strides multiples of 16), and the PTX must use only 128-bit global accesses.
COMPILE_SM90 = textwrap.dedent(
    """
    import re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ultraflux_model.kernels.rope import _rope_kernel
    from ultraflux_model.kernels.wavelet_loss import _wavelet_huber_kernel

    def compile_sm90(fn, types, constants, multiples_of_16):
        names = fn.arg_names
        signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in multiples_of_16}
        source = ASTSource(fn, signature, constants, attrs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

    def check(name, ptx):
        scalar = re.findall(r"(?:ld|st)[.]global(?:[.][a-z]+)*[.]b16", ptx)
        vector = re.findall(r"(?:ld|st)[.]global(?:[.][a-z]+)*[.]v4", ptx)
        assert vector and not scalar, (name, len(vector), len(scalar))
        print(name, "ok")

    rope_types = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16"}
    rope_aligned = [*rope_types, "stride_xb", "stride_xh", "stride_xs", "stride_ob", "stride_oh", "stride_os",
                    "stride_cs", "stride_ss", "head_dim"]
    unit = {"stride_xd": 1, "stride_od": 1, "stride_cd": 1, "stride_sd": 1}
    for transpose in (False, True):
        constants = {"BLOCK_S": 16, "BLOCK_D": 128, "HEADS": 4, "TRANSPOSE": transpose, **unit}
        check(f"rope transpose={transpose}", compile_sm90(_rope_kernel, rope_types, constants, rope_aligned))

    loss_types = {"pred_ptr": "*bf16", "target_ptr": "*bf16", "t_ptr": "*fp32", "grad_loss_ptr": "*fp32"}
    loss_types.update({n: "fp32" for n in ("scale", "gamma", "alpha", "beta", "c_min", "c_max", "t_clamp",
                                           "w_ll", "w_lh", "w_hl", "w_hh")})
    loss_aligned = ["pred_ptr", "target_ptr", "out_ptr", "stride_pb", "stride_pc", "stride_ph", "stride_tb",
                    "stride_tc", "stride_th", "channels", "out_h", "out_w"]
    for backward in (False, True):
        types = dict(loss_types, out_ptr="*bf16" if backward else "*fp32")
        constants = {"BLOCK_H": 16, "BLOCK_W": 64, "BACKWARD": backward, "ACC": tl.float32, "stride_pw": 1,
                     "stride_tw": 1}
        check(f"loss backward={backward}", compile_sm90(_wavelet_huber_kernel, types, constants, loss_aligned))
    """
)


def _run(script: str, *args: str, interpret: bool, cache_dir=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)


def run_check(device: str, size: str, interpret: bool) -> subprocess.CompletedProcess:
    return _run(CHECK, device, size, interpret=interpret)


@pytest.mark.gpu
def test_compiled_kernels_match_references_on_cuda():
    proc = run_check("cuda", "big", interpret=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_the_cuda_check_itself_passes_under_the_interpreter():
    """Keeps the GPU-only check above runnable: same script, small shapes, CPU tensors, Triton's interpreter."""
    proc = run_check("cpu", "small", interpret=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_kernels_compile_for_sm90_with_128_bit_memory_access(tmp_path):
    """The GPU code path without a GPU: Triton → PTX → cubin for sm_90, coalesced vector loads and stores only."""
    proc = _run(COMPILE_SM90, interpret=False, cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["rope", "transpose=False", "ok", "rope", "transpose=True", "ok",
                                   "loss", "backward=False", "ok", "loss", "backward=True", "ok"]
