"""Per-GPU memory of a training run: model states by ZeRO stage and precision, activations per Flux block.

Pure arithmetic (no torch), so ``ultraflux plan`` can size a 12B run on a laptop.

**Model states** follow DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``, no offload), per parameter:

=========================  =====  ================================================================
bf16 mixed precision       bytes  where it lives
=========================  =====  ================================================================
params (bf16)                  2  replicated for stages 0–2, partitioned (1/N) for stage 3
grads (bf16)                   2  replicated for stages 0–1, partitioned for stages 2 (stage 3: only
                                  transiently in reduce buckets, DeepSpeed counts none)
fp32 gradient partition        4  what the optimizer steps on; partitioned for stages ≥ 1
fp32 master weights            4  partitioned for stages ≥ 1
Adam m and v (fp32)            8  partitioned for stages ≥ 1
=========================  =====  ================================================================

so stage 2 = 2P + 18P/N and stage 3 = 18P/N + 4·largest_layer (the largest layer gathered whole in bf16,
params + grads), exactly DeepSpeed's numbers. In plain fp32 there is no master copy and no second gradient:
params 4 + grads 4 + Adam 8 (stage 3 gathers 8·largest_layer). The EMA (fp32, on each rank's partition,
``training/ema.py``) adds 4P/N and is reported apart.

**Activations** (what autograd holds for backward) of one Flux block, per sample, for ``s`` tokens of a
stream of width D, MLP width F = 4D, H heads, S = N + T joint tokens, compute dtype of ``b`` bytes. The
counts are the unique tensors autograd saves (parameters excluded), read off diffusers' blocks with our
attention processor; ``tests/model/training/test_plan.py`` checks them against a measured real-width run.

* dual-stream block, per stream (image s = N, text s = T):
  8 tensors [s, D] (AdaLN-Zero LayerNorm input and normalised output, the modulated q/k/v input, the
  attention projection output before the gate, the residual sum into the second LayerNorm, its normalised and
  modulated output, the MLP output before its gate), 2 tensors [s, F] (GELU input, second MLP linear input),
  2 LayerNorm statistics [s] ×2 LayerNorms, and the q/k RMSNorm in fp32 (2 × [s, D] fp32 each for q and k,
  plus [s, H] fp32 rsqrt each);
  joint attention: q, k, v, output [S, D] in b bytes and the fp32 log-sum-exp [H, S].
* single-stream block over S tokens: 4 × [S, D], [S, F] (GELU input), [S, D + F] (the concatenated
  ``proj_out`` input), 1 LayerNorm's statistics, the q/k RMSNorm in fp32, and the same attention terms.
* around the blocks: the patch embedding input [N, C_in], the context embedding input [T, J], the output
  AdaLN (input, normalised, modulated = ``proj_out`` input: 3 × [N, D], stats) and the RoPE cos/sin tables
  (2 × [S, head_dim] fp32, shared by all blocks).

With gradient checkpointing (diffusers checkpoints every block) a block keeps only its inputs,
[N, D] + [T, D] in b bytes, until backward recomputes it; the peak then adds the largest block's full
activations once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GB = 1e9  # decimal, as DeepSpeed's estimator prints and GPU vendors sell
Precision = Literal["bf16", "fp32"]


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of each model-state kind (see the module docstring for the accounting)."""

    params: float
    grads: float
    master: float
    optimizer: float
    gathered: float  # ZeRO-3: the largest layer's params + grads, gathered whole for compute

    @property
    def total(self) -> float:
        return self.params + self.grads + self.master + self.optimizer + self.gathered


def model_state_bytes(
    params: int, largest_layer: int, *, zero_stage: int, precision: Precision, gpus: int
) -> ModelStates:
    """Per-GPU bytes of weights, gradients, master weights and Adam states for ``params`` over ``gpus`` ranks."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if gpus < 1:
        raise ValueError(f"gpus must be ≥ 1, got {gpus}")
    n, p = gpus, float(params)
    if precision == "bf16":
        weight, grad16, grad32, master, adam = 2, 2, 4, 4, 8
    else:
        weight, grad16, grad32, master, adam = 4, 4, 0, 0, 8
    part = (lambda x: x / n) if zero_stage >= 1 else (lambda x: x)
    grads = (grad16 * p if zero_stage <= 1 else (grad16 * p / n if zero_stage == 2 else 0.0)) + part(grad32 * p)
    if precision == "fp32" and zero_stage == 3:
        grads = grad16 * p / n  # the fp32 gradient partition is the only gradient copy
    return ModelStates(
        params=weight * p / n if zero_stage == 3 else weight * p,
        grads=grads,
        master=part(master * p),
        optimizer=part(adam * p),
        gathered=2 * weight * float(largest_layer) if zero_stage == 3 else 0.0,
    )


@dataclass(frozen=True)
class FluxShape:
    """The widths that set a Flux DiT's activation memory (from its transformer config)."""

    dim: int  # D = heads × head_dim (3072 for FLUX.1-dev)
    heads: int  # H (24)
    head_dim: int  # 128
    mlp_dim: int  # F = 4D (12288)
    in_channels: int  # C_in of the patch embedding (64)
    joint_dim: int  # J, T5 width (4096)
    pooled_dim: int  # P, CLIP pooled width (768)
    double_blocks: int  # 19
    single_blocks: int  # 38


def double_block_bytes(shape: FluxShape, image_tokens: int, text_tokens: int, b: int) -> float:
    """Activations one dual-stream block saves for backward, per sample (bytes)."""
    d, f, h = shape.dim, shape.mlp_dim, shape.heads
    streams = image_tokens + text_tokens  # both streams save the same tensors per token
    per_token = 8 * d * b + 2 * f * b + 2 * 2 * b + 2 * 2 * d * 4 + 2 * h * 4
    return streams * per_token + streams * (4 * d * b + h * 4) + 18 * d * b  # + attention; + AdaLN vectors


def single_block_bytes(shape: FluxShape, image_tokens: int, text_tokens: int, b: int) -> float:
    """Activations one single-stream block saves for backward, per sample (bytes)."""
    d, f, h = shape.dim, shape.mlp_dim, shape.heads
    s = image_tokens + text_tokens
    per_token = 4 * d * b + f * b + (d + f) * b + 2 * b + 2 * 2 * d * 4 + 2 * h * 4
    return s * per_token + s * (4 * d * b + h * 4) + 5 * d * b  # + attention; + AdaLN vectors


def outer_bytes(shape: FluxShape, image_tokens: int, text_tokens: int, b: int) -> float:
    """Activations saved outside the blocks (embeddings, output norm and projection, RoPE tables), per sample."""
    n, t = image_tokens, text_tokens
    embed = n * shape.in_channels * b + t * shape.joint_dim * b
    # timestep and guidance embedders (256 sinusoidal channels in), pooled-text projection, AdaLN vectors
    vectors = (2 * 256 + 9 * shape.dim + shape.pooled_dim) * b
    # a single-stream block returns views of one [N + T, D] tensor: the norm input keeps the text rows alive too
    last = (n + t if shape.single_blocks else n) * shape.dim * b
    norm_out = last + 2 * n * shape.dim * b + 2 * n * b
    rope = 2 * (n + t) * shape.head_dim * 4
    return embed + vectors + norm_out + rope


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch: ``held`` between forward and backward, ``recompute`` added during backward."""

    held: float
    recompute: float  # checkpointing: the largest block's activations while it is recomputed (0 without)

    @property
    def peak(self) -> float:
        return self.held + self.recompute


def activation_bytes(
    shape: FluxShape, image_tokens: int, text_tokens: int, *, micro_batch: int, b: int, checkpointing: bool
) -> Activations:
    """Activation bytes of one micro-batch of ``micro_batch`` samples (see the module docstring)."""
    dbl = double_block_bytes(shape, image_tokens, text_tokens, b) if shape.double_blocks else 0.0
    sgl = single_block_bytes(shape, image_tokens, text_tokens, b) if shape.single_blocks else 0.0
    outer = outer_bytes(shape, image_tokens, text_tokens, b)
    if not checkpointing:
        return Activations(micro_batch * (outer + shape.double_blocks * dbl + shape.single_blocks * sgl), 0.0)
    # each checkpointed block keeps its two inputs; the RoPE tables are held by the checkpoints, counted in outer
    kept = (shape.double_blocks + shape.single_blocks) * (image_tokens + text_tokens) * shape.dim * b
    return Activations(micro_batch * (outer + kept), micro_batch * max(dbl, sgl))
