"""The accelerators of the denoiser, chosen by ``generate.accel`` (docs/inference.md "Accelerators"): diffusers' own
cache hooks (FirstBlockCache, TaylorSeer), regional ``torch.compile`` of the repeated blocks, torchao FP8 weight-only
Linears, and diffusers' context parallelism (one image's tokens over the ranks of a torchrun launch).

The cache is a set of hooks that can change between two images of one loaded pipeline (:func:`set_cache`); the rest
changes the loaded weights or their code and is fixed when the pipeline is loaded (:func:`apply_load_time`). Every
refusal is checked before any weights are read (:func:`check_accel`) and is one ``UltraFluxError`` line naming the
setting.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import AccelConfig, Offload

# Settings that change the loaded transformer itself; a pipeline loaded with other values must be reloaded.
LOAD_TIME = ("compile", "quantize", "parallel", "parallel_attention")
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada (8.9), Hopper (9.0) and newer
# diffusers' attention backend for ring attention on a GPU: ring needs each chunk's log-sum-exp, which the native
# SDPA backend does not return; cuDNN's SDPA does.
RING_BACKEND = "_native_cudnn"


def load_time(accel: AccelConfig) -> dict[str, Any]:
    """The part of ``accel`` that a loaded pipeline is bound to (:data:`LOAD_TIME`)."""
    return {name: getattr(accel, name) for name in LOAD_TIME}


def check_accel(accel: AccelConfig, device: torch.device, offload: Offload = "none") -> None:
    """Raise ``UltraFluxError`` when ``accel`` cannot run on ``device`` (before anything is loaded)."""
    if accel.quantize == "fp8":
        check_fp8(device)
        if offload != "none":
            raise UltraFluxError(
                f"quantize: fp8 keeps the float8 weights on the GPU; it cannot be combined with offload {offload} "
                "(use offload none, or quantize none)"
            )
    if accel.parallel == "context":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            raise UltraFluxError(
                "parallel: context splits one image over the processes of a torchrun launch; run "
                f"'torchrun --nproc-per-node N -m ultraflux.cli generate …' with N >= 2 (WORLD_SIZE is {world})"
            )
        if offload != "none":
            raise UltraFluxError(f"parallel: context keeps every rank's model on its device; use offload none, "
                                 f"not {offload}")  # fmt: skip
        if accel.parallel_attention == "ring" and device.type != "cuda":
            raise UltraFluxError(
                "parallel_attention: ring needs a GPU attention backend that returns the log-sum-exp (diffusers' "
                "native CPU attention does not); use parallel_attention: ulysses on CPU"
            )


def check_fp8(device: torch.device) -> None:
    """Raise ``UltraFluxError`` unless ``device`` can run torchao's float8 weight-only matmuls."""
    if device.type != "cuda":
        raise UltraFluxError(
            f"quantize: fp8 needs a CUDA GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
            f"or newer (Ada, Hopper, Blackwell); this run is on {device.type}: use quantize: none"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise UltraFluxError(
            f"quantize: fp8 needs compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use quantize: none"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UltraFluxError("quantize: fp8 needs torchao: pip install 'torchao==0.18.0'") from None


def cache_config(accel: AccelConfig, dtype: torch.dtype) -> Any:
    """diffusers' hook config for ``accel.cache`` (None for ``none``); ``dtype``: the TaylorSeer factors'."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if accel.cache == "first_block":
        return FirstBlockCacheConfig(threshold=accel.cache_threshold)
    if accel.cache == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=accel.taylorseer_interval,
            disable_cache_before_step=accel.taylorseer_warmup,
            max_order=accel.taylorseer_order,
            taylor_factors_dtype=dtype,
            use_lite_mode=accel.taylorseer_predict == "output",
        )
    return None


def set_cache(transformer: Any, accel: AccelConfig) -> None:
    """Put ``transformer``'s cache hooks in the state ``accel`` asks for (nothing to do when they already are)."""
    wanted = cache_config(accel, transformer.dtype)
    current = transformer._cache_config
    if current == wanted:
        return
    if current is not None:
        transformer.disable_cache()
    if wanted is not None:
        transformer.enable_cache(wanted)


def apply_load_time(transformer: Any, accel: AccelConfig) -> None:
    """FP8 weights, then context parallelism, then regional compilation, on a transformer already on its device."""
    if accel.quantize == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(transformer, Float8WeightOnlyConfig())
    if accel.parallel == "context":
        enable_context_parallel(transformer, accel)
    if accel.compile == "regional":
        # One compiled graph per block class, reused by all 57 blocks; the cache hooks stay Python around them.
        transformer.compile_repeated_blocks()


def init_context_parallel() -> torch.device:
    """Join the torchrun launch's process group (nccl on GPUs, gloo on CPUs); this rank's device."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def enable_context_parallel(transformer: Any, accel: AccelConfig) -> None:
    """diffusers' context parallelism over every rank of the process group (Ulysses or ring attention)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    if accel.parallel_attention == "ring":
        transformer.set_attention_backend(RING_BACKEND)
        config = ContextParallelConfig(ring_degree=world)
    else:
        config = ContextParallelConfig(ulysses_degree=world)
    transformer.enable_parallelism(config=config)
    # Each rank's pos-embed sees only its slice of the ids; the YaRN span is the whole image's.
    transformer.pos_embed.span_group = config._flattened_mesh.get_group()


def check_split(transformer: Any, text_tokens: int, image_tokens: int) -> None:
    """Raise ``UltraFluxError`` unless context parallelism can split this image evenly over the ranks."""
    parallel = transformer._parallel_config
    if parallel is None or parallel.context_parallel_config is None:
        return
    cp = parallel.context_parallel_config
    world = cp.ring_degree * cp.ulysses_degree
    heads = transformer.config.num_attention_heads
    if cp.ulysses_degree > 1 and heads % cp.ulysses_degree:
        raise UltraFluxError(f"parallel: context (ulysses) needs the {heads} attention heads to split evenly over "
                             f"{cp.ulysses_degree} ranks; launch a divisor of {heads} processes")  # fmt: skip
    for what, tokens in (("text tokens (max_sequence_length)", text_tokens), ("image tokens", image_tokens)):
        if tokens % world:
            raise UltraFluxError(
                f"parallel: context splits the {tokens} {what} over {world} ranks; they must divide evenly "
                f"(image tokens are (width/32)·(height/32))"
            )


def is_writer() -> bool:
    """Whether this process writes the images: the only one, or rank 0 of a context-parallel launch."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def count_evaluations(transformer: Any) -> dict[str, int]:
    """Live counts of the block and attention evaluations ``transformer`` really runs (benchmarks, tests).

    Forward hooks on the first op inside each block and inside each block's attention: a cache hook replaces the
    forward of a whole block or attention module, so a hook on that module itself would count a skipped call too.
    Reset by assigning 0 to both keys.
    """
    counts = {"blocks": 0, "attention": 0}

    def bump(key: str) -> Any:
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        (block.norm1 if hasattr(block, "norm1") else block.norm).register_forward_hook(bump("blocks"))
        block.attn.to_q.register_forward_hook(bump("attention"))
    return counts
