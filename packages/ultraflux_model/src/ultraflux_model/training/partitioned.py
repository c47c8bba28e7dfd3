"""Build the transformer already partitioned by ZeRO-3 and stream its safetensors weights into the partitions.

``from_pretrained`` materialises the whole fp32 model on every rank before DeepSpeed partitions it (~48 GB
per rank for the 12B DiT). Here the model is built under ``deepspeed.zero.Init``, which partitions every
submodule's parameters as soon as that submodule's ``__init__`` returns, so construction never holds more
than one layer beyond the rank's share. Then each rank reads, for every parameter, only the bytes of its own
ZeRO-3 slice straight from the safetensors file into ``param.ds_tensor``.

ZeRO-3 lays a parameter out flat: rank r owns elements [r·n, (r+1)·n) of the row-major tensor (n =
ceil(numel / world), the last rank padded). In a safetensors file a tensor is one row-major byte range, so a
rank's slice is one contiguous byte range: it is read with plain positioned reads rather than through
``safe_open``'s memory map, whose touched pages stay resident (and count toward the rank's RSS) until the
file is closed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.loading import check_local_component, mismatch_message, unknown_config_keys

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec) → torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit; a larger value means a corrupt or hostile file
READ_CHUNK_BYTES = 64 * 2**20  # conversions (e.g. bf16 file → fp32 partition) go through buffers this big


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and the absolute byte offset of its first element."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for side in self.shape:
            n *= side
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Name → ``TensorEntry`` of every tensor in one safetensors file (reads the header only).

    Format: u64 little-endian header size N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``
    (offsets relative to the end of the header), then the data.
    """
    path = Path(path)
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UltraFluxError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise UltraFluxError(f"{path} declares a {size}-byte header: not a valid safetensors file")
        try:
            header = json.loads(fh.read(size))
        except ValueError as err:
            raise UltraFluxError(f"{path} has a corrupt safetensors header: {err}") from err
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise UltraFluxError(f"{path}: tensor {name} has dtype {info['dtype']}, which this loader does not read")
        begin, end = info["data_offsets"]
        entry = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin)
        if end - begin != entry.numel * entry.dtype.itemsize:
            raise UltraFluxError(f"{path}: tensor {name} spans {end - begin} bytes, its shape needs another size")
        entries[name] = entry
    return entries


def checkpoint_index(directory: Path, weights_name: str = "diffusion_pytorch_model") -> dict[str, TensorEntry]:
    """Every tensor of a diffusers component folder: one ``{weights_name}.safetensors`` or a sharded index."""
    directory = Path(directory)
    check_local_component(directory, weights_name)
    index_file = directory / f"{weights_name}.safetensors.index.json"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise UltraFluxError(f"{index_file} lists shard {shard}, which is missing from {directory}")
            for name, entry in read_safetensors_header(directory / shard).items():
                if weight_map.get(name) == shard:
                    entries[name] = entry
        listed_elsewhere = sorted(set(weight_map) - set(entries))
        if listed_elsewhere:
            raise UltraFluxError(f"{index_file} maps {listed_elsewhere[:5]} to shards that do not hold them")
        return entries
    single = directory / f"{weights_name}.safetensors"
    if not single.is_file():
        raise UltraFluxError(f"{directory} has neither {single.name} nor {index_file.name}")
    return read_safetensors_header(single)


def read_flat_range(fh: BinaryIO, entry: TensorEntry, start: int, out: torch.Tensor) -> None:
    """Elements ``[start, start + out.numel())`` of the flattened tensor ``entry`` into the 1-D ``out``.

    Reads straight into ``out`` when the dtypes agree, else through buffers of at most ``READ_CHUNK_BYTES``.
    """
    count, item = out.numel(), entry.dtype.itemsize
    if start < 0 or start + count > entry.numel:
        raise UltraFluxError(f"{entry.path}: elements [{start}, {start + count}) are outside a {entry.shape} tensor")
    fh.seek(entry.offset + start * item)
    if out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu":
        _read_exact(fh, out.view(torch.uint8).numpy(), entry)
        return
    per_chunk = max(1, READ_CHUNK_BYTES // item)
    for first in range(0, count, per_chunk):
        n = min(per_chunk, count - first)
        buffer = torch.empty(n * item, dtype=torch.uint8)
        _read_exact(fh, buffer.numpy(), entry)
        out[first : first + n].copy_(buffer.view(entry.dtype))


def _read_exact(fh: BinaryIO, target: Any, entry: TensorEntry) -> None:
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise UltraFluxError(f"{entry.path} ends early: the file is truncated")
        done += n


def zero3_slice(param: torch.nn.Parameter) -> tuple[torch.Tensor, int, int]:
    """(this rank's flat partition, index of its first element in the full tensor, how many are real)."""
    part = param.ds_tensor
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0
    n = part.numel()
    start = rank * n
    return part, start, max(0, min(n, param.ds_numel - start))


@torch.no_grad()
def stream_into_module(module: torch.nn.Module, entries: dict[str, TensorEntry], source: str) -> None:
    """Fill every parameter and persistent buffer of ``module`` from ``entries`` (ZeRO-3 partitions: only the slice).

    Strict like ``from_pretrained`` here: missing, unexpected or mis-shaped tensors are an error.
    """
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buf
    problems = {
        "missing_keys": sorted(set(tensors) - set(entries)),
        "unexpected_keys": sorted(set(entries) - set(tensors)),
        "mismatched_keys": sorted(
            f"{k} (file {list(entries[k].shape)}, model {list(_full_shape(t))})"
            for k, t in tensors.items() if k in entries and tuple(_full_shape(t)) != entries[k].shape
        ),
    }
    if any(problems.values()):
        raise UltraFluxError(mismatch_message(source, type(module).__name__, problems))
    handles: dict[Path, BinaryIO] = {}
    try:
        for name, tensor in tensors.items():
            entry = entries[name]
            fh = handles.get(entry.path) or handles.setdefault(entry.path, entry.path.open("rb"))
            if hasattr(tensor, "ds_tensor"):
                part, start, count = zero3_slice(tensor)
                read_flat_range(fh, entry, start, part.view(-1)[:count])
                part.view(-1)[count:].zero_()  # the last rank's padding
            else:
                read_flat_range(fh, entry, 0, tensor.data.view(-1))
    finally:
        for fh in handles.values():
            fh.close()


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    return tensor.ds_shape if hasattr(tensor, "ds_shape") else tensor.shape


def build_partitioned(cls: type, directory: Path, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Collective: ``cls`` (a diffusers model) from ``directory``'s ``config.json`` under ``deepspeed.zero.Init``
    (partitioned as ZeRO-3 with ``ds_config`` says), its safetensors streamed into the partitions.

    Each rank's host memory peaks at its share of the parameters plus about one layer.
    """
    import deepspeed

    directory = Path(directory)
    offload = (ds_config.get("zero_optimization", {}).get("offload_param") or {}).get("device", "none")
    if offload == "nvme":
        raise UltraFluxError(
            "partitioned loading writes each rank's slice into its in-memory partition; NVMe parameter offload "
            "swaps partitions out: set zero_optimization.offload_param.device to cpu or none"
        )
    weights_name = getattr(cls, "weights_name", "diffusion_pytorch_model")
    entries = checkpoint_index(directory, weights_name)
    config = json.loads((directory / "config.json").read_text())
    unknown = unknown_config_keys(cls, config, getattr(cls, "accepted_foreign_keys", frozenset()))
    if unknown:
        raise UltraFluxError(
            f"{directory}/config.json has keys that {cls.__name__} does not know: {', '.join(unknown)}. "
            "Remove them or fix their spelling."
        )
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = cls.from_config(config)
    stream_into_module(model, entries, str(directory))
    return model
