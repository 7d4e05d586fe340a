"""W4A16 products on CPU (csrc/w4_panels.c): the 4-bit codes stay 4-bit in memory and are dequantized inside
the product, so a decode step streams about a sixth of float32's bytes (4 bits a weight, plus a float32 scale
and minimum per group and output: 5 bits a weight at group size 64).

``W4Panels.from_awq`` repacks AutoAWQ's "GEMM" tensors at load into panels of 16 outputs whose 16-byte rows
hold two input rows' codes (low and high nibbles), and the scales and zeros into float32 (scale, min) pairs,
min = -zero * scale. Torch reference: ``awq_torch.dequantize_awq`` (``W4Panels.weight_t`` undoes the packing).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import cpu_native
from .awq_torch import unpack_columns


def available() -> bool:
    """Whether the native 4-bit products are built (AVX-512 kernels, or AVX2 and FMA ones)."""
    so = cpu_native.lib()
    return so is not None and bool(so.w4_available())


def _block() -> int:
    so = cpu_native.lib()
    return int(so.w4_block()) if so is not None else 32


class W4Panels:
    """4-bit weights [out, in] for ``w4_linear``: ``codes`` uint8 [T, in/2, 16], ``pairs`` float32
    [T, in/group, 2, 16] with T = outputs padded to the kernel's block, / 16."""

    __slots__ = ("codes", "pairs", "out_features", "in_features", "group_size")

    def __init__(self, codes: torch.Tensor, pairs: torch.Tensor, out_features: int, group_size: int):
        self.codes, self.pairs = codes, pairs
        self.out_features, self.in_features, self.group_size = out_features, codes.shape[1] * 2, group_size

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> "W4Panels":
        z = unpack_columns(qzeros).float()  # [groups, out]
        s = scales.float()
        return cls.from_codes(unpack_columns(qweight), s, -z * s)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> "W4Panels":
        """q: codes 0..15 [in, out]; scale, minimum: float32 [groups, out], weight = q * scale + minimum."""
        k, n = q.shape
        groups = scale.shape[0]
        if k % groups or (k // groups) % 2:
            raise ValueError(f"W4 panels: {k} input rows do not split into {groups} groups of an even size")
        s, mn = scale.float(), minimum.float()
        block = _block()
        padded = -(-n // block) * block
        if padded != n:  # zero codes, scales and minimums: the padding outputs are 0 and never written
            q, s, mn = (torch.cat([t, t.new_zeros(t.shape[0], padded - n)], 1) for t in (q, s, mn))
        t = padded // 16
        q = q.to(torch.uint8).view(k // 2, 2, t, 16)
        codes = (q[:, 0] | (q[:, 1] << 4)).permute(1, 0, 2).contiguous()  # [T, in/2, 16]
        pairs = torch.stack([s, mn], 1).view(groups, 2, t, 16).permute(2, 0, 1, 3).contiguous()
        return cls(codes, pairs, n, k // groups)

    def weight_t(self) -> torch.Tensor:
        """The dequantized W^T [in, out] float32 (tests and the torch fallback)."""
        t, half, _ = self.codes.shape
        q = torch.stack([self.codes & 0xF, self.codes >> 4], 2).permute(1, 2, 0, 3).reshape(half * 2, t * 16).float()
        s, mn = self.pairs[:, :, 0].permute(1, 0, 2).reshape(-1, t * 16), self.pairs[:, :, 1].permute(1, 0, 2).reshape(-1, t * 16)
        w = q.view(s.shape[0], self.group_size, -1) * s[:, None] + mn[:, None]
        return w.view(half * 2, -1)[:, :self.out_features]

    def nbytes(self) -> int:
        return self.codes.numel() + self.pairs.numel() * 4


def to_huge_pages(panels: List[W4Panels]) -> None:
    """Move the panels' tensors into one arena of huge pages (host_memory.huge_empty), each on a 64-byte
    boundary: a decode step streams all of them, as it streams the float32 panels' arena."""
    from ..host_memory import huge_empty
    tensors = [(p, name) for p in panels for name in ("codes", "pairs")]
    size = lambda t: -(-t.numel() * t.element_size() // 64) * 64  # noqa: E731
    arena, at = huge_empty(sum(size(getattr(p, n)) for p, n in tensors), torch.uint8), 0
    for p, name in tensors:
        t = getattr(p, name)
        n = t.numel() * t.element_size()
        setattr(p, name, arena[at:at + n].view(t.dtype).view(t.shape).copy_(t))
        at += size(t)


def linear(x: torch.Tensor, packed: W4Panels, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, in] float32 @ W^T (+ bias) -> [M, out] contiguous."""
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, packed.out_features, dtype=torch.float32)
    if m:
        cpu_native.lib().w4_linear(x.data_ptr(), packed.codes.data_ptr(), packed.pairs.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), m, packed.out_features,
                                   packed.in_features, packed.group_size, torch.get_num_threads())
    return y
