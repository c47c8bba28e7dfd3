"""Fused RoPE Triton kernel vs diffusers' apply_rotary_emb and a float64 complex oracle, on CPU (Triton interpreter).

TRITON_INTERPRET must be set before Triton kernels are defined, i.e. before the first import of
``ultraflux_model.kernels.rope``: hence the assignment above the imports. It stays set for the whole
pytest process, so on a machine with CUDA this module runs in a child process with CUDA hidden
(test_kernels_interpreter_on_cuda.py) rather than turn every Triton kernel of the session into an interpreted one;
test_kernels_cuda.py checks the compiled kernels there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

if torch.cuda.is_available():  # run in a child without CUDA by test_kernels_interpreter_on_cuda.py
    pytest.skip("CUDA visible: this module runs in a CUDA-less child (test_kernels_interpreter_on_cuda.py)",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from ultraflux_core.errors import UltraFluxError  # noqa: E402
from ultraflux_model.kernels import rope as rope_kernel  # noqa: E402
from ultraflux_model.kernels.launch import check_launchable  # noqa: E402
from ultraflux_model.kernels.rope import apply_rope  # noqa: E402
from ultraflux_model.modules.attention import rotate  # noqa: E402

# One rounding of a float32 result to the storage dtype. The interpreter truncates float32 -> bfloat16
# where the GPU rounds to nearest, hence one bf16 ulp; float32 and float16 must match diffusers exactly.
FORWARD_TOL = {
    torch.float32: dict(rtol=0.0, atol=0.0),
    torch.float16: dict(rtol=0.0, atol=0.0),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
}
ONE_ROUNDING_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
}
# diffusers' autograd rounds its two backward terms to x.dtype before adding them; the kernel rounds once.
BACKWARD_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _tables(seq: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved real RoPE tables ``[S, D]`` (each angle repeated for its pair), with a magnitude like YaRN's."""
    gen = torch.Generator().manual_seed(seed)
    angles = (torch.rand(seq, dim // 2, generator=gen, dtype=torch.float64) * 40).repeat_interleave(2, dim=-1)
    return (1.1 * angles.cos()).float(), (1.1 * angles.sin()).float()


def _oracle(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs as complex numbers in float64: (x₀ + i·x₁)·(cos + i·sin)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos[:, 0::2].double(), sin[:, 0::2].double())
    return torch.view_as_real(pairs * rot).flatten(-2)


def _diffusers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)


SHAPES = [(1, 1, 1, 2), (2, 3, 37, 128), (1, 2, 5, 6), (3, 5, 17, 16)]  # [B, H, S, D]; S=37, 17: partial blocks


@pytest.fixture(params=["interpreter-tiles", "cuda-tiles"])
def tiling(request, monkeypatch):
    """Run with the interpreter's one-big-program tiling and with the CUDA tiling (many programs, partial blocks)."""
    if request.param == "cuda-tiles":
        monkeypatch.setitem(rope_kernel._TILING, "cpu", rope_kernel._TILING["cuda"])
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_diffusers(shape, dtype, tiling):
    batch, heads, seq, dim = shape
    cos, sin = _tables(seq, dim, seed=seq)
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)

    x_kernel = x.clone().requires_grad_(True)
    out = apply_rope(x_kernel, cos, sin)
    out.backward(grad)
    x_eager = x.clone().requires_grad_(True)
    expected = _diffusers(x_eager, cos, sin)
    expected.backward(grad)

    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **FORWARD_TOL[dtype])
    torch.testing.assert_close(x_kernel.grad, x_eager.grad, **BACKWARD_TOL[dtype])
    # Tighter, independent of diffusers: the gradient is the inverse rotation of grad, rounded once.
    inverse = _oracle(grad, cos, -sin).to(dtype)
    torch.testing.assert_close(x_kernel.grad, inverse, **ONE_ROUNDING_TOL[dtype])


def test_float32_matches_complex_oracle_and_backward_is_the_inverse_rotation():
    cos, sin = _tables(23, 32, seed=1)
    x = torch.randn(2, 3, 23, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.double(), _oracle(x.detach(), cos, sin), rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    # The Jacobian is the rotation by +θ scaled by m, so its transpose rotates by -θ: (cos, -sin).
    torch.testing.assert_close(x.grad.double(), _oracle(grad, cos, -sin), rtol=1e-6, atol=1e-6)


def test_general_tables_follow_diffusers_elementwise(tiling):
    """Tables whose pair entries differ pin which column of cos/sin each output uses, forward and backward."""
    gen = torch.Generator().manual_seed(3)
    cos, sin = torch.randn(9, 10, generator=gen), torch.randn(9, 10, generator=gen)
    x = torch.randn(2, 3, 9, 10, generator=gen, requires_grad=True)
    grad = torch.randn(2, 3, 9, 10, generator=gen)
    apply_rope(x, cos, sin).backward(grad)
    x_eager = x.detach().clone().requires_grad_(True)
    expected = _diffusers(x_eager, cos, sin)
    expected.backward(grad)
    torch.testing.assert_close(apply_rope(x.detach(), cos, sin), expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_eager.grad, **BACKWARD_TOL[torch.float32])


def test_transposed_view_keeps_its_layout_and_matches_the_eager_rotate(tiling):
    """The attention processor's call: x ``[B, S, H, D]`` → ``transpose(1, 2)`` → kernel → transpose back."""
    batch, seq, heads, dim = 2, 19, 3, 64
    cos, sin = _tables(seq, dim, seed=4)
    x = torch.randn(batch, seq, heads, dim, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    view = x.transpose(1, 2)
    out = apply_rope(view, cos, sin)
    assert out.stride() == view.stride() and out.dtype == torch.bfloat16
    fused = rotate(x, cos, sin, kernel="triton")
    assert fused.is_contiguous()
    torch.testing.assert_close(fused, rotate(x, cos, sin, kernel="eager"), **FORWARD_TOL[torch.bfloat16])


def test_strided_inputs_and_tables(tiling):
    seq, dim = 11, 8
    wide = torch.randn(2, 2, seq, 2 * dim, generator=torch.Generator().manual_seed(6))
    x = wide[..., 1 : 1 + dim]  # D-strided slice: no dense layout at all
    cos_full, sin_full = _tables(seq, 2 * dim, seed=7)
    cos, sin = cos_full[:, :dim], sin_full[:, :dim]  # column slices: row stride 2·D
    assert not x.is_contiguous() and not cos.is_contiguous()
    x = x.requires_grad_(True)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, _diffusers(x.detach(), cos, sin), rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).transpose(-1, -2).contiguous().mT
    out.backward(grad)  # a non-contiguous incoming gradient
    x_eager = x.detach().clone().requires_grad_(True)
    _diffusers(x_eager, cos, sin).backward(grad)
    torch.testing.assert_close(x.grad, x_eager.grad, **BACKWARD_TOL[torch.float32])


def test_rejects_bad_inputs():
    cos, sin = _tables(4, 8, seed=0)
    with pytest.raises(UltraFluxError, match="even"):
        apply_rope(torch.zeros(1, 1, 4, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(UltraFluxError, match=r"\[S, D\]"):
        apply_rope(torch.zeros(1, 1, 5, 8), cos, sin)
    with pytest.raises(UltraFluxError, match=r"\[B, H, S, D\]"):
        apply_rope(torch.zeros(4, 8), cos, sin)
    with pytest.raises(UltraFluxError, match="cos/sin"):
        apply_rope(torch.zeros(1, 1, 4, 8), cos.requires_grad_(True), sin)


def test_launch_check_names_the_missing_interpreter():
    def plain_python_kernel():  # stands in for a kernel compiled for the GPU
        pass

    with pytest.raises(UltraFluxError, match="TRITON_INTERPRET=1"):
        check_launchable(plain_python_kernel, torch.zeros(2))


@pytest.fixture(scope="module")
def official_transformer(reference_fixtures):
    from safetensors.torch import load_file
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    root = reference_fixtures / "transformer"
    return UltraFluxTransformer2DModel.from_pretrained(root / "model").eval(), load_file(root / "io.safetensors")


def _run_transformer(model, io, kernel, dtype):
    model.set_rope_kernel(kernel)
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    inputs = {k: io[k].to(dtype, copy=True) for k in names}  # copies: the fixture tensors stay untouched
    inputs["hidden_states"].requires_grad_(True)
    out = model(
        **inputs, timestep=io["timestep"].to(dtype), img_ids=io["img_ids"], txt_ids=io["txt_ids"],
        guidance=io["guidance"].to(dtype), return_dict=False,
    )[0]  # fmt: skip
    out.float().square().mean().backward()
    grads = {"hidden_states": inputs["hidden_states"].grad, "to_q": model.transformer_blocks[0].attn.to_q.weight.grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_whole_transformer_fused_rope_matches_eager_and_the_official_output(official_transformer):
    """The fixture model (official weights, 3,207 joint tokens) through the attention processor's fused path."""
    model, io = official_transformer
    out, grads = _run_transformer(model, io, "triton", torch.float32)
    eager_out, eager_grads = _run_transformer(model, io, "eager", torch.float32)
    torch.testing.assert_close(out, io["output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_whole_transformer_fused_rope_matches_eager_in_bf16(official_transformer):
    model, io = official_transformer
    model.to(torch.bfloat16)
    try:
        out, grads = _run_transformer(model, io, "triton", torch.bfloat16)
        eager_out, eager_grads = _run_transformer(model, io, "eager", torch.bfloat16)
    finally:
        model.to(torch.float32)
    # Element-wise: within 4 bf16 ulps (2^-5) of each element, plus an absolute floor of ONE ulp of the largest
    # entry (2^-7·max) for elements near zero, whose value comes from cancelling larger bf16 terms. Measured on
    # the fixture: 0.0 / 0.014 / 0.0 relative needed past that floor (output / input grad / to_q grad).
    for name, got, expected in [("output", out, eager_out), *((n, g, eager_grads[n]) for n, g in grads.items())]:
        floor = 2**-7 * expected.float().abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), atol=floor, rtol=2**-5, msg=name)


def test_kernels_interpret_even_when_triton_was_imported_first():
    """In the full suite another module may import Triton (e.g. via diffusers) before TRITON_INTERPRET=1 is set;
    the kernels must not depend on Triton's own @jit helpers, which are then compiled-mode only."""
    script = textwrap.dedent(
        """
        import os
        import diffusers.models.embeddings  # imports triton without the interpreter flag
        import torch
        os.environ["TRITON_INTERPRET"] = "1"
        from ultraflux_model.config import LossConfig
        from ultraflux_model.diffusion.losses import snr_huber_wavelet_loss as reference
        from ultraflux_model.kernels.rope import apply_rope
        from ultraflux_model.kernels.wavelet_loss import snr_huber_wavelet_loss as fused

        x, table = torch.randn(2, 3, 5, 8), torch.randn(5, 8)
        rotary = diffusers.models.embeddings.apply_rotary_emb
        expected = rotary(x, (table, table), use_real=True, use_real_unbind_dim=-1)
        torch.testing.assert_close(apply_rope(x, table, table), expected, rtol=0, atol=0)
        p, q, t = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6), torch.tensor([0.2, 0.9])
        params = LossConfig().model_dump()
        torch.testing.assert_close(fused(p, q, t, **params), reference(p, q, t, **params), rtol=1e-5, atol=0)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


def test_fused_backward_passes_gradcheck():
    """RoPE is linear in x and rotates in float32, so float32 finite differences are exact enough."""
    cos, sin = _tables(3, 4, seed=9)
    x = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(10), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not a double precision" input: intended here
        rotate_x = lambda v: apply_rope(v, cos, sin)  # noqa: E731
        assert torch.autograd.gradcheck(rotate_x, (x,), eps=1e-2, atol=1e-3, rtol=1e-3, fast_mode=True)
