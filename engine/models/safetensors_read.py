"""Read a .safetensors file tensor by tensor with plain reads, not a memory map.

A memory-mapped checkpoint's pages count in the process's resident memory while it is mapped: loading a
float32 SmolLM2 that way peaked at the weights twice (1363 MiB of RSS, 721 of them the model's own memory).
Read into a fresh tensor each, the file's pages stay in the page cache and the peak is the model plus the
largest single tensor.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (and
an optional "__metadata__"), then the tensors' bytes, offsets counted from the end of the header.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size


def read_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the file, in file order, each in memory of its own."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        header.pop("__metadata__", None)
        start = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; readable: {', '.join(DTYPES)}")
            shape, (begin, end) = list(info["shape"]), info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name!r} {info['dtype']}{shape} needs {nbytes} bytes, "
                                 f"its offsets give {end - begin}")
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                fh.seek(start + begin)
                got = fh.readinto(memoryview(buf.numpy()))
                if got != nbytes:
                    raise ValueError(f"{path}: truncated: tensor {name!r} has {got} of its {nbytes} bytes")
            yield name, buf.view(dtype).view(shape)
