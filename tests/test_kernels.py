"""Paged attention: torch reference against dense attention, and the Triton kernel against the torch reference."""
import os

import pytest
import torch

from engine.kernels.paged_attention_torch import paged_decode_attention, prefill_attention

triton_kernel = pytest.importorskip("engine.kernels.paged_attention_triton")
CUDA = torch.cuda.is_available()


def paged_inputs(B, H, KVH, D, BS, ctx_lens, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // BS) for c in ctx_lens)
    num_blocks = B * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)  # scattered, non-contiguous block ids
    bt = perm[:B * max_blocks].view(B, max_blocks)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    ctx = torch.tensor(ctx_lens)
    return [t.to(device) for t in (q, k, v, bt, ctx)]


def dense_reference(q, k, v, bt, ctx, scale):
    """Per sequence: gather its context in order and run plain softmax attention (repeat KV heads)."""
    B, H, D = q.shape
    BS, KVH = k.shape[1], k.shape[2]
    outs = []
    for b in range(B):
        n = int(ctx[b])
        kk = torch.cat([k[blk] for blk in bt[b]])[:n]  # [n, KVH, D]
        vv = torch.cat([v[blk] for blk in bt[b]])[:n]
        kk = kk.repeat_interleave(H // KVH, dim=1)  # [n, H, D]
        vv = vv.repeat_interleave(H // KVH, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), kk.float()) * scale, -1)
        outs.append(torch.einsum("hn,nhd->hd", w, vv.float()))
    return torch.stack(outs)


def test_torch_paged_decode_matches_dense():
    q, k, v, bt, ctx = paged_inputs(3, 6, 2, 16, 4, [5, 12, 1])
    out = paged_decode_attention(q, k, v, bt, ctx, 0.3)
    assert torch.allclose(out, dense_reference(q, k, v, bt, ctx, 0.3), atol=1e-5)


def test_prefill_with_cached_prefix_matches_dense_causal():
    g = torch.Generator().manual_seed(1)
    n, start, H, KVH, D = 5, 7, 4, 2, 8
    q = torch.randn(n, H, D, generator=g)
    k = torch.randn(start + n, KVH, D, generator=g)
    v = torch.randn(start + n, KVH, D, generator=g)
    out = prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), start, 0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for i in range(n):
        ctx = start + i + 1
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i], kk[:ctx]) * 0.5, -1)
        assert torch.allclose(out[i], torch.einsum("hn,nhd->hd", w, vv[:ctx]), atol=1e-5)


@pytest.mark.skipif(not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("B,H,KVH,D,BS,ctx", [
    (2, 4, 4, 16, 8, [9, 16]),  # MHA
    (3, 6, 2, 16, 4, [5, 12, 1]),  # GQA, group 3 (padded to 4 inside the kernel)
    (2, 8, 1, 32, 16, [40, 17]),  # MQA
])
def test_triton_paged_decode_matches_torch(B, H, KVH, D, BS, ctx):
    dev = "cuda" if CUDA else "cpu"
    q, k, v, bt, c = paged_inputs(B, H, KVH, D, BS, ctx, device=dev)
    out = triton_kernel.paged_decode_attention_triton(q, k, v, bt, c, 0.25)
    ref = paged_decode_attention(q, k, v, bt, c, 0.25)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_triton_wrapper_rejects_bad_shapes():
    q, k, v, bt, c = paged_inputs(2, 4, 2, 12, 4, [3, 5])  # head_dim 12 is not a power of two
    with pytest.raises(ValueError, match="power"):
        triton_kernel.paged_decode_attention_triton(q, k, v, bt, c, 0.25)
    q, k, v, bt, c = paged_inputs(2, 5, 2, 16, 4, [3, 5])
    with pytest.raises(ValueError, match="multiple"):
        triton_kernel.paged_decode_attention_triton(q, k, v, bt, c, 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_paged_decode_gpu_sizes(dtype):
    q, k, v, bt, c = paged_inputs(32, 32, 8, 128, 64, [1 + 37 * i for i in range(32)], dtype=dtype, device="cuda")
    out = triton_kernel.paged_decode_attention_triton(q, k, v, bt, c, 128 ** -0.5)
    ref = paged_decode_attention(q.float(), k.float(), v.float(), bt, c, 128 ** -0.5)
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_engine_block_major_decode_matches_reference():
    """The engine's CPU decode path (caches [blocks, KVH, bs, D]) against the slot-gather reference."""
    from engine.layers.attention import AttentionMetadata, torch_decode
    q, k, v, bt, c = paged_inputs(3, 6, 2, 16, 4, [5, 12, 1])
    meta = AttentionMetadata(positions=None, slot_blocks=None, slot_offsets=None, num_decode=3,
                             decode_block_tables=bt, decode_ctx_lens=c)
    out = torch_decode(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), meta, 0.3)
    assert torch.allclose(out, paged_decode_attention(q, k, v, bt, c, 0.3), atol=1e-5)
