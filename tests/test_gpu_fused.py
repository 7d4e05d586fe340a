"""The GPU decoder path: fused Triton kernels against the torch layers they replace, and decode steps run
from padded static buffers (the CUDA graphs' inputs) against the ordinary step. On CPU the kernels run under
TRITON_INTERPRET=1 and the static-buffer step runs without capture; GPU-marked tests replay real graphs."""
import os

import pytest
import torch
import torch.nn.functional as F

from engine.core.messages import ScheduledSeq, SchedulerOutput
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from tiny_models import engine_model

gf = pytest.importorskip("engine.kernels.gpu_fused")
CUDA = torch.cuda.is_available()
RUNS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (RUNS and gf.HAVE_TRITON), reason="needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_and_residual_add_match_torch(dtype):
    if dtype == torch.float16 and not CUDA:
        pytest.skip("float16 arithmetic on the GPU")
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(5, 96, generator=g).to(DEV, dtype) for _ in range(2))
    norm = RMSNorm(96, 1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert torch.allclose(gf.rmsnorm(x, norm.weight, 1e-5), norm(x), **tol)
    out, res = gf.add_rmsnorm(x, r, norm.weight, 1e-5)
    assert torch.equal(res, x + r)
    assert torch.allclose(out, norm(x + r), **tol)


def test_silu_mul_matches_torch():
    gu = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEV)  # two column tiles
    ref = F.silu(gu[:, :1500]) * gu[:, 1500:]
    assert torch.allclose(gf.silu_mul(gu), ref, atol=1e-6, rtol=1e-5)


def test_rope_write_rotates_and_fills_the_slots():
    T, H, KVH, D, nb, bs = 4, 4, 2, 16, 5, 8
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(DEV)
    pos = torch.tensor([0, 7, 8, 30], device=DEV)
    cos, sin = RotaryEmbedding(D, 10000.0, 64, device=DEV).cos_sin(pos)
    blocks, offsets = torch.tensor([3, 0, 1, 4], device=DEV), pos % bs
    kc, vc = (torch.zeros(nb, KVH, bs, D, device=DEV) for _ in range(2))
    q = gf.rope_write(qkv, cos, sin, kc, vc, blocks, offsets, H, KVH)
    qr, kr, vr = qkv.split([H * D, KVH * D, KVH * D], dim=1)
    assert torch.allclose(q, apply_rotary(qr.reshape(T, H, D), cos, sin), atol=1e-5)
    k_ref, v_ref = torch.zeros_like(kc), torch.zeros_like(vc)
    k_ref[blocks, :, offsets] = apply_rotary(kr.reshape(T, KVH, D), cos, sin)
    v_ref[blocks, :, offsets] = vr.reshape(T, KVH, D)
    assert torch.allclose(kc, k_ref, atol=1e-5) and torch.equal(vc, v_ref)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_rope_write_quant_matches_rotary_then_the_quantized_write(bits, static):
    """RoPE and the int8 / int4 K/V write in one kernel against apply_rotary and QuantKV.write (codes
    rounded half to even, (scale, min) beside them; static: the slots' given per-head pairs, codes only):
    float32 codes and parameters identical, untouched slots left as they were; float16 on a GPU within one
    code."""
    from engine.kernels.rope_write_quant import rope_write_quant
    from engine.layers.kv_quant import QuantKV, packed_dim
    dtype = torch.float16 if CUDA else torch.float32
    T, H, KVH, D, nb, bs = 5, 4, 2, 16, 4, 8
    g = torch.Generator().manual_seed(6)
    qkv = (3 * torch.randn(T, (H + 2 * KVH) * D, generator=g)).to(DEV, dtype)
    qkv[1, (H + KVH) * D:(H + KVH + 1) * D] = 0.25  # a constant v: scale at its floor
    pos = torch.tensor([0, 7, 8, 30, 13], device=DEV)
    cos, sin = RotaryEmbedding(D, 10000.0, 64, device=DEV).cos_sin(pos)
    blocks, offsets = torch.tensor([3, 0, 1, 2, 1], device=DEV), pos % bs
    pdt = torch.float32 if dtype == torch.float32 else torch.float16

    pairs = torch.tensor([[0.07, -4.0], [0.05, -3.5]])  # static: per head (scale, min)

    def caches():
        codes = (nb, KVH, bs, packed_dim(D, bits))
        params = (pairs[None, :, None, :].expand(nb, KVH, bs, 2) if static else torch.zeros(nb, KVH, bs, 2))
        return [QuantKV(torch.randint(0, 255, codes, generator=g, dtype=torch.uint8).to(DEV),
                        params.to(DEV, pdt).clone(), bits, D, dtype, static) for _ in range(2)]
    kc, vc = caches()
    k_ref, v_ref = (QuantKV(c.data.clone(), c.params.clone(), bits, D, dtype, static) for c in (kc, vc))
    q = rope_write_quant(qkv, cos, sin, kc, vc, blocks, offsets, H, KVH)
    qr, kr, vr = qkv.split([H * D, KVH * D, KVH * D], dim=1)
    q_ref = apply_rotary(qr.reshape(T, H, D), cos, sin).float()
    assert torch.allclose(q.float(), q_ref, atol=2e-2 if CUDA else 1e-5)
    k_ref.write(blocks, offsets, apply_rotary(kr.reshape(T, KVH, D), cos, sin))
    v_ref.write(blocks, offsets, vr.reshape(T, KVH, D))
    for got, want in ((kc, k_ref), (vc, v_ref)):
        if CUDA:  # float16 rotation rounds apart from torch's
            for codes in ((lambda d: d.int()), (lambda d: (d & 15).int()), (lambda d: (d >> 4).int())):
                assert (codes(got.data) - codes(want.data)).abs().max() <= 1
            assert torch.allclose(got.params.float(), want.params.float(), rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(got.data, want.data) and torch.equal(got.params, want.params)


@pytest.mark.parametrize("G,splits", [(1, 0), (3, 0), (1, 2), (3, 3)])
def test_rope_decode_kernel_matches_rope_write_then_attention(G, splits):
    """RoPE, the K/V write and paged attention in one kernel against the two steps it replaces (rope_write,
    then torch_decode over the written cache): a sequence with two drafts (three rows attending to each other
    and to 13 cached positions across blocks), one with a single row and nothing cached, one at a block's
    first slot; grouped heads padded (3 to 4) or not. The kernel writes this step's K/V into a block no
    table names and the tables' slots for them hold noise, so its outputs show it took this step's rows
    from q/k/v (programs of one launch cannot see each other's writes on a GPU), not from the cache.
    splits 2 and 3: the cached context attended in parts of 16 and 8 positions by programs of their own
    (some parts empty), merged by the last to finish, which leaves its counter zeroed."""
    from engine.kernels.rope_decode_triton import rope_decode
    from engine.layers.attention import AttentionMetadata, torch_decode
    KVH, D, nb, bs = 2, 16, 8, 8
    H = G * KVH
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(nb, KVH, bs, D, generator=g).to(DEV) for _ in range(2))
    # rows: A at positions 13, 14, 15 (drafts), B at 0, C at 8
    pos = torch.tensor([13, 14, 15, 0, 8], device=DEV)
    bt = torch.tensor([[2, 5, 0], [2, 5, 0], [2, 5, 0], [6, 0, 0], [1, 7, 0]], device=DEV)
    blocks = bt.gather(1, (pos // bs)[:, None]).squeeze(1)
    meta = AttentionMetadata(positions=pos, slot_blocks=blocks, slot_offsets=pos % bs, num_decode=5,
                             decode_block_tables=bt, decode_ctx_lens=(pos + 1).to(torch.int32),
                             decode_fresh=torch.tensor([1, 2, 3, 1, 1], device=DEV, dtype=torch.int32))
    meta.cos, meta.sin = RotaryEmbedding(D, 10000.0, 64, device=DEV).cos_sin(pos)
    qkv = torch.randn(5, (H + 2 * KVH) * D, generator=g).to(DEV)
    k_ref, v_ref = kc.clone(), vc.clone()
    q = gf.rope_write(qkv, meta.cos, meta.sin, k_ref, v_ref, blocks, pos % bs, H, KVH)
    ref = torch_decode(q, k_ref, v_ref, meta, D ** -0.5)
    scratch = torch.full_like(blocks, nb - 1)  # the kernel writes here; the tables' slots keep their noise
    slots = torch.arange(5, device=DEV)
    kmeta = AttentionMetadata(positions=pos, slot_blocks=scratch, slot_offsets=slots, num_decode=5,
                              decode_block_tables=bt, decode_ctx_lens=meta.decode_ctx_lens,
                              decode_fresh=meta.decode_fresh)
    out = rope_decode(qkv, meta.cos, meta.sin, kc, vc, kmeta, H, KVH, D ** -0.5, splits=splits)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    if splits:
        from engine.kernels.awq_common import _workspace
        assert not _workspace(qkv.device, 1, 5 * KVH)[1].any()
    assert torch.allclose(kc[nb - 1, :, :5], k_ref[blocks, :, pos % bs].transpose(0, 1), atol=1e-6)
    assert torch.equal(vc[nb - 1, :, :5], v_ref[blocks, :, pos % bs].transpose(0, 1))
    with pytest.raises(ValueError, match="does not match 4 heads"):
        rope_decode(qkv, meta.cos, meta.sin, kc, vc, meta, 4, KVH + 1, 0.25)


def gpu_path_without_capture(runner, max_blocks: int, scratch: int, max_batch: int = 4) -> None:
    """What a runner sets up on a GPU (fused kernels, Triton paged decode over dense or int8 / int4 blocks,
    the graphs' static buffers with a scratch block), on a CPU runner: the static-buffer steps run without
    capture."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.kernels.paged_attention_quant_triton import triton_quant_decode
    from engine.kernels.paged_attention_triton import triton_decode
    model = runner.model
    model.fused_decoder = None
    quant = runner.kv.quant_policy
    for layer in model.layers:
        layer.attn.decode_fn = triton_quant_decode if quant else triton_decode
    model.use_gpu_fused(rope_in_kernel=True)
    assert all(layer.attn.fused_attend != bool(quant) and layer.attn.fused_rope for layer in model.layers)
    runner.graphs = DecodeGraphs(model, runner.kv, runner.rope, runner.device, max_batch=max_batch,
                                 max_blocks=max_blocks, scratch_block=scratch, capture=False)
    runner._usable_blocks = scratch


PROMPTS = [[5, 9, 1, 30, 2], list(range(3, 20)), [7] * 9]  # 5, 17 and 9 tokens: blocks of 8 cross


def _prefill_then_decode(runner, steps=3, fixed_tokens=(11, 4, 60)):
    """Prefill the prompts, then decode ``steps`` steps feeding fixed tokens; -> logits of each step."""
    bs = runner.block_size
    tables = [[3 * i + j for j in range(3)] for i in range(len(PROMPTS))]  # 3 blocks of 8 per sequence
    out = [runner.logits_for(SchedulerOutput([ScheduledSeq(f"r{i}", p, 0, tables[i], True)
                                              for i, p in enumerate(PROMPTS)]))]
    for s in range(steps):
        seqs = [ScheduledSeq(f"r{i}", [fixed_tokens[i]], len(p) + s, tables[i], True) for i, p in enumerate(PROMPTS)]
        out.append(runner.logits_for(SchedulerOutput(seqs)))
    # then two of them in the other order (rows reused by other sequences, the batch padded from 2)
    seqs = [ScheduledSeq(f"r{i}", [5], len(PROMPTS[i]) + steps, tables[i], True) for i in (2, 0)]
    out.append(runner.logits_for(SchedulerOutput(seqs)))
    assert max(len(p) + steps + 1 for p in PROMPTS) <= 3 * bs
    return out


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_static_buffer_decode_matches_the_ordinary_step(qkv_bias):
    """The GPU path (fused kernels, Triton paged decode, padded static buffers with a scratch block) against
    the CPU engine's ordinary step: prefill, three decode steps of three sequences padded to four, then two of
    them in the other order."""
    from engine.model_runner import ModelRunner
    ref = ModelRunner(engine_model("cpu", torch.float32, qkv_bias), 9, 8, "cpu", torch.float32, [0])
    model = engine_model(DEV, torch.float32, qkv_bias)
    runner = ModelRunner(model, 10, 8, DEV, torch.float32, [0])  # block 9: the padding rows' scratch
    gpu_path_without_capture(runner, max_blocks=3, scratch=9)
    got, want = _prefill_then_decode(runner), _prefill_then_decode(ref)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a.cpu(), b, atol=1e-4, rtol=1e-4)
    # the padding row wrote only into the scratch block; the sequences' blocks match the reference cache
    assert torch.allclose(runner.kv.data[:, :, :9].cpu(), ref.kv.data, atol=1e-5)
    assert runner.kv.data[:, :, 9].abs().sum() > 0


def _awq_model(device, dtype):
    """The tiny model with W4A16 q/k/v, o, gate/up and down (group 32), random quantized tensors."""
    from engine.layers.awq_linear import AwqLinear, swap_in_awq
    model = engine_model("cpu", torch.float32)
    swap_in_awq(model, 32)
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, AwqLinear):
            m.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, m.qweight.shape, generator=g, dtype=torch.int32))
            m.qzeros.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, m.qzeros.shape, generator=g, dtype=torch.int32))
            m.scales.copy_(torch.rand(m.scales.shape, generator=g) * 0.02 + 0.005)
    return model.to(device, dtype)


@pytest.mark.parametrize("layout", ["awq", "kpack"])
def test_w4a16_products_make_their_inputs_on_the_gpu_path(layout, monkeypatch):
    """The GPU decode path of a W4A16 model, whose q/k/v and gate/up products make RMSNorm(x + residual) *
    weight (the first layer's RMSNorm(x) * weight) and whose down product makes SiLU(gate) * up as they
    load x, against the ordinary CPU step of the same model (its layers on the native 4-bit products where
    they are built, else dequantizing in torch): one sequence
    decoding one row at a time through the graphs' static buffers (the one-row kernels), then three
    sequences at once (the batches' products norm and gate first)."""
    from engine.kernels import awq_gemv
    from engine.layers.awq_linear import AwqLinear, use_gpu_layout
    from engine.model_runner import ModelRunner
    from engine.layers import awq_linear
    monkeypatch.setenv("RAYLM_W4A16_TUNE", "0")  # on a GPU: the default tiles, no timing at start
    monkeypatch.setattr(awq_linear, "GPU_LAYOUT", layout)  # what a GPU runner repacks to without the tuner
    modes = []
    x_input = awq_gemv.x_input
    monkeypatch.setattr(awq_gemv, "x_input", lambda *a: (lambda r: (modes.append(r[1]), r)[1])(x_input(*a)))
    ref = ModelRunner(_awq_model("cpu", torch.float32), 9, 8, "cpu", torch.float32, [0])
    model = _awq_model(DEV, torch.float32)
    use_gpu_layout(model, layout)
    for m in model.modules():
        if isinstance(m, AwqLinear):
            m.kernels_on_cpu = True
    runner = ModelRunner(model, 10, 8, DEV, torch.float32, [0])
    gpu_path_without_capture(runner, max_blocks=3, scratch=9, max_batch=1)
    table, prompt = [6, 7, 8], [5, 9, 1, 30, 2, 44, 8]  # 7 tokens, then decode across the block boundary
    for r in (runner, ref):
        r.logits_for(SchedulerOutput([ScheduledSeq("s", prompt, 0, table, True)]))
    for i, tok in enumerate((11, 4, 60)):
        step = SchedulerOutput([ScheduledSeq("s", [tok], len(prompt) + i, table, True)])
        assert torch.allclose(runner.logits_for(step).cpu(), ref.logits_for(step), atol=1e-4, rtol=1e-4)
    # per layer: q/k/v normed (the first layer without a residual), o as it is, gate/up normed, down gated
    assert modes[:8] == [3, 0, 2, 1, 2, 0, 2, 1]
    for a, b in zip(_prefill_then_decode(runner), _prefill_then_decode(ref)):
        assert torch.allclose(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_quantized_kv_decode_path_matches_the_ordinary_step(quant_policy):
    """The GPU path over int8 / int4 KV blocks (RoPE and the quantized K/V write in one kernel, the Triton
    quantized paged decode, the graphs' static buffers) against the CPU engine's ordinary step over the
    same policy: prefill, three decode steps of three sequences padded to four, then two of them."""
    from engine.model_runner import ModelRunner
    ref = ModelRunner(engine_model("cpu", torch.float32), 9, 8, "cpu", torch.float32, [0], quant_policy=quant_policy)
    runner = ModelRunner(engine_model(DEV, torch.float32), 10, 8, DEV, torch.float32, [0], quant_policy=quant_policy)
    gpu_path_without_capture(runner, max_blocks=3, scratch=9)
    tol = 1e-3 if CUDA else 1e-4  # a GPU's fused multiply-adds can move a code by one
    for a, b in zip(_prefill_then_decode(runner), _prefill_then_decode(ref)):
        assert torch.allclose(a.cpu(), b, atol=tol, rtol=tol)
    if not CUDA:
        assert torch.equal(runner.kv.data[:, :, :9], ref.kv.data)  # the same codes in every written slot


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("quant_policy", [0, 8])
def test_cuda_graph_replay_matches_eager_steps(quant_policy):
    """float16 on the GPU: decode steps replayed from captured graphs give the eager fused path's logits."""
    from engine.model_runner import ModelRunner
    eager = ModelRunner(engine_model("cuda", torch.float16), 9, 8, "cuda", torch.float16, [0],
                        quant_policy=quant_policy)
    graphed = ModelRunner(engine_model("cuda", torch.float16), 9, 8, "cuda", torch.float16, [0],
                          quant_policy=quant_policy, cuda_graph_max_batch=4, max_blocks_per_seq=3)
    assert graphed.graphs is not None and graphed.graphs.sizes == [1, 2, 4]
    assert eager.graphs is None
    for a, b in zip(_prefill_then_decode(graphed), _prefill_then_decode(eager)):
        assert torch.allclose(a, b, atol=2e-3, rtol=2e-3)


def test_graph_sizes_pad_to_vllm_style_buckets():
    from engine.cuda_graphs import graph_sizes
    assert graph_sizes(1) == [1]
    assert graph_sizes(4) == [1, 2, 4]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gpu_decode_path_follows_transformers(kind, tmp_path):
    """The GPU decode path against Hugging Face: prefill three prompts, then four decode steps of all three
    (padded to four), feeding both the same tokens. On a GPU: float16, fused kernels and real CUDA graphs;
    on CPU: float32, the fused kernels interpreted and the graphs' static buffers run without capture."""
    from tiny_models import make_hf_model
    from engine.model_runner import ModelRunner
    from engine.models.loader import load_model
    (tmp_path / "tok").mkdir()
    hf = make_hf_model(kind, tmp_path / "tok", tmp_path / "m")
    dtype = torch.float16 if CUDA else torch.float32
    hf = hf.to(DEV, dtype)
    model, _ = load_model(str(tmp_path / "m"), DEV, dtype)
    # on a GPU the runner holds a 13th (scratch) block for the graphs itself; on CPU it is given one
    runner = ModelRunner(model, 12 if CUDA else 13, 8, DEV, dtype, [2], cuda_graph_max_batch=4, max_blocks_per_seq=4)
    if not CUDA:
        gpu_path_without_capture(runner, max_blocks=4, scratch=12)
    assert runner.graphs is not None
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 11, 7)]
    tables = [[4 * i + j for j in range(4)] for i in range(3)]
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    ours = runner.logits_for(SchedulerOutput([ScheduledSeq(f"r{i}", s, 0, tables[i], True) for i, s in enumerate(seqs)]))
    for step in range(5):
        with torch.no_grad():
            ref = torch.stack([hf(torch.tensor([s], device=DEV)).logits[0, -1].float() for s in seqs])
        assert torch.allclose(ours.float(), ref, **tol), f"step {step}: {(ours.float() - ref).abs().max()}"
        if step == 4:
            break
        nxt = ref.argmax(-1).tolist()
        batch = [ScheduledSeq(f"r{i}", [t], len(s), tables[i], True) for i, (s, t) in enumerate(zip(seqs, nxt))]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours = runner.logits_for(SchedulerOutput(batch))


def test_draft_rows_through_the_graphs_static_buffers_follow_transformers(tmp_path):
    """A decode step with speculative drafts replays the graphs too (each draft one row, attending to the rows
    before it): the drafts kept and the token after them are transformers' greedy ones, beside a plain decode
    in the same step."""
    from tiny_models import make_hf_model
    from engine.generation import GenerationConfig
    from engine.model_runner import ModelRunner
    from engine.models.loader import load_model
    (tmp_path / "tok").mkdir()
    dtype = torch.float16 if CUDA else torch.float32
    hf = make_hf_model("llama", tmp_path / "tok", tmp_path / "m", seed=7).to(DEV, dtype)
    model, _ = load_model(str(tmp_path / "m"), DEV, dtype)
    runner = ModelRunner(model, 8 if CUDA else 9, 8, DEV, dtype, [2], cuda_graph_max_batch=8, max_blocks_per_seq=4)
    if not CUDA:
        gpu_path_without_capture(runner, max_blocks=4, scratch=8, max_batch=8)
    calls = []
    run = runner.graphs.run
    runner.graphs.run = lambda seqs: (calls.append(sum(len(m.token_ids) for m in seqs)), run(seqs))[1]

    def greedy(ids, n):
        x = torch.tensor([ids], device=DEV)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=[])
        return out[0, len(ids):].tolist()

    pa, pb = [5, 80, 81, 82, 5, 80, 81], [9, 10, 11, 12, 13]
    ga, gb = greedy(pa, 4), greedy(pb, 2)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    runner.logits_for(SchedulerOutput([ScheduledSeq("a", pa, 0, tables[0], True),
                                       ScheduledSeq("b", pb, 0, tables[1], True)]))  # prefill (eager)
    g = GenerationConfig(temperature=0, max_new_tokens=8)
    wrong = (ga[3] + 1) % 96
    step = SchedulerOutput([
        ScheduledSeq("a", [ga[0], ga[1], ga[2], wrong], len(pa), tables[0], True, params=g, prompt_token_ids=pa,
                     output_token_ids=[ga[0]], num_draft=3),
        ScheduledSeq("b", [gb[0]], len(pb), tables[1], True, params=g, prompt_token_ids=pb, output_token_ids=[gb[0]])])
    out = runner.execute(step)
    assert calls == [5]  # one static-buffer step of five rows
    assert out.accepted == {"a": [ga[1], ga[2]]} and out.sampled == {"a": ga[3], "b": gb[1]}
