"""Group quantization and the AutoAWQ GEMM packing, against independent references of the documented layout."""
import pytest
import torch

from quant_jobs.quantize import (check_group, dequantize, fake_quant, pack_awq, pack_columns, quant_params, quantize,
                                 unpack_awq, unpack_columns)

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of each int32 holds column ORDER[i] of its 8


def reference_pack(v):
    """Bit by bit, straight from the layout description: rows x cols of 4-bit values -> uint32 words."""
    rows, cols = v.shape
    words = [[0] * (cols // 8) for _ in range(rows)]
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for i in range(8):
                word |= int(v[r, c * 8 + ORDER[i]]) << (4 * i)
            words[r][c] = word
    return words


def test_pack_matches_reference_layout_and_round_trips():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 16, (6, 24), generator=g, dtype=torch.int32)
    packed = pack_columns(v)
    assert packed.dtype == torch.int32 and packed.shape == (6, 3)
    as_uint = (packed.to(torch.int64) & 0xFFFFFFFF).tolist()
    assert as_uint == reference_pack(v)
    assert torch.equal(unpack_columns(packed), v)


def test_pack_awq_shapes_and_dequantized_weights():
    out_f, in_f, G = 16, 64, 32
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    sc, z = quant_params(w, 4, G)
    q = quantize(w, sc, z, 4)
    qweight, qzeros, scales = pack_awq(q, sc, z)
    assert qweight.shape == (in_f, out_f // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (in_f // G, out_f // 8) and qzeros.dtype == torch.int32
    assert scales.shape == (in_f // G, out_f) and scales.dtype == torch.float16
    # reference unpack of qweight: word [i, c] nibble k -> output column c*8 + ORDER[k], input row i
    ref_q = torch.zeros(out_f, in_f, dtype=torch.int32)
    for i in range(in_f):
        for c in range(out_f // 8):
            word = int(qweight[i, c]) & 0xFFFFFFFF
            for k in range(8):
                ref_q[c * 8 + ORDER[k], i] = (word >> (4 * k)) & 0xF
    assert torch.equal(ref_q, q)
    dq = unpack_awq(qweight, qzeros, scales)
    assert torch.equal(dq, fake_quant(w, 4, G))  # the packed checkpoint equals the fake-quantized weights


def test_quantization_bounds_and_exact_grid():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    sc, z = quant_params(w, 4, 64)
    q = quantize(w, sc, z, 4)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert float(z.min()) >= 0 and float(z.max()) <= 15 and torch.equal(z, z.round())
    err = (dequantize(q, sc, z) - w).abs().reshape(8, 2, 64)
    assert bool((err <= sc[..., None] * 0.5 + 1e-6).all())  # within half a step everywhere
    # a group already on a 16-level grid comes back exactly: values 0.25 * k, k = 0..15
    grid = (torch.arange(16).float() * 0.25).repeat(2)[None]
    assert torch.equal(fake_quant(grid, 4, 32), grid)
    s, zz = quant_params(grid, 4, 32)
    assert float(s) == 0.25 and float(zz) == 0


def test_group_size_error_names_layer_and_working_sizes():
    check_group("down_proj", 1536, 128)
    with pytest.raises(ValueError, match=r"w_group_size: 128 does not divide down_proj's input size 576.*\[32, 64\]"):
        check_group("down_proj", 576, 128)
