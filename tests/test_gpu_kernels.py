"""GPU kernels against the fp32 reference, with flash-attn's relative-tolerance rule: a bf16 kernel
may be off the fp32 reference by at most twice what PyTorch's own bf16 attention is off by."""

from __future__ import annotations

import pytest
import torch

from foundry_padfree.attention import BACKENDS, available_backends
from foundry_padfree.varlen import unpad
from tests.conftest import loss_and_grads, tiny_model

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["triton", "torch_varlen", "flex", "flash_attn"]
DOC_LENS = [1, 17, 128, 300, 64, 513]


def _needs(backend: str) -> None:
    if not torch.cuda.is_available() or backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")


def _meta(doc_lens):
    positions = torch.cat([torch.arange(n) for n in doc_lens])[None].cuda()
    return unpad(torch.zeros_like(positions), position_ids=positions).meta


def _bound(ours: torch.Tensor, pt: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return (ours.float() - ref).abs().max().item(), (pt.float() - ref).abs().max().item()


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_forward_and_backward_against_fp32_reference(backend, kv_heads):
    _needs(backend)
    torch.manual_seed(0)
    T, N, H = sum(DOC_LENS), 8, 64
    meta = BACKENDS[backend].prepare(_meta(DOC_LENS), N // kv_heads)  # gqa, mqa: triton packs heads
    q32, k32, v32 = (torch.randn(T, n, H, device="cuda", requires_grad=True) for n in (N, kv_heads, kv_heads))
    grad_out = torch.randn(T, N, H, device="cuda")
    scale = H**-0.5

    def run(name, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
        out = BACKENDS[name].attend(q, k, v, meta, scale)
        out.backward(grad_out.to(dtype))
        return out, q.grad, k.grad, v.grad

    ref = run("sdpa", torch.float32)
    pt = run("sdpa", torch.bfloat16)
    ours = run(backend, torch.bfloat16)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, pt, ref):
        err, pt_err = _bound(o, p, r)
        print(f"{backend} {kv_heads}kv {what}: max|ours-fp32|={err:.3e} max|torch bf16-fp32|={pt_err:.3e}")
        assert err <= 2 * pt_err + 1e-5, (what, err, pt_err)


@pytest.mark.parametrize("kv_heads", [2, 8], ids=["packed", "unpacked"])
def test_triton_attention_takes_more_tiles_than_a_grid_axis_y_holds(kv_heads):
    # 70,000 one-token documents: 70,000 tiles per kernel, more than the 65,535 programs CUDA
    # allows on grid axis y. Each token attends only to itself: out = v (its key/value head),
    # dv = the summed gradient of its group's heads, dq = dk = 0.
    _needs("triton")
    T, N, H = 70_000, 8, 64
    meta = BACKENDS["triton"].prepare(_meta([1] * T), N // kv_heads)
    q, k, v = (torch.randn(T, n, H, device="cuda", dtype=torch.bfloat16) for n in (N, kv_heads, kv_heads))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(T, N, H, device="cuda", dtype=torch.bfloat16)
    out = BACKENDS["triton"].attend(q, k, v, meta, H**-0.5)
    out.backward(grad_out)
    group = N // kv_heads
    torch.testing.assert_close(out, v.detach().repeat_interleave(group, dim=1), atol=0, rtol=0)
    dv = grad_out.float().view(T, kv_heads, group, H).sum(2)
    torch.testing.assert_close(v.grad.float(), dv, atol=2e-2, rtol=1e-2)
    assert q.grad.abs().max() < 1e-3 and k.grad.abs().max() < 1e-3


@pytest.mark.parametrize(
    "head_dim, dtype, lens, tiles",
    [
        (128, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS"),
        (128, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS_PACKED"),
        (80, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS"),
        (80, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS_PACKED"),
        (64, torch.float16, [2048, 5, 700, 1], "SHORT_DOCS"),
        (64, torch.bfloat16, [4096, 3000, 20], "LONG_DOCS"),
        (64, torch.bfloat16, [4096, 3000, 20], "LONG_DOCS_PACKED"),
        (128, torch.bfloat16, [4096, 3000, 20], "LONG_DOCS_PACKED"),
        (128, torch.bfloat16, [4096, 3000, 20], "LONG_DOCS"),
        (96, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS_PACKED"),
    ],
)
def test_triton_attention_other_head_dims_dtypes_and_long_documents(head_dim, dtype, lens, tiles):
    _needs("triton")
    _check_triton_against_fp32(head_dim, dtype, lens, tiles)


def test_triton_attention_takes_fewer_stages_where_shared_memory_runs_out(monkeypatch):
    # At head dim 256 the presets' pipeline stages need more shared memory than an H200 has (as the
    # smaller GPUs' do at 128): the launches retry with fewer stages and get the same results.
    from foundry_padfree import triton_attention

    _needs("triton")
    monkeypatch.setattr(triton_attention, "MAX_HEAD_DIM", 256)
    monkeypatch.setattr(triton_attention, "_STAGES_THAT_FIT", {})
    _check_triton_against_fp32(256, torch.bfloat16, [2048, 5, 700, 1], "SHORT_DOCS")
    fewer = {key[0]: n for key, n in triton_attention._STAGES_THAT_FIT.items()}
    print(f"stages that fit at head dim 256: {fewer}")
    assert fewer["_fwd_kernel"] < triton_attention.FWD_STAGES


@pytest.mark.parametrize(
    "head_dim, lens, tiles",
    [
        (64, [2048, 5, 700, 1], "SHORT_DOCS"),
        (64, [2048, 5, 700, 1], "SHORT_DOCS_PACKED"),
        (64, [4096, 3000, 20], "LONG_DOCS_PACKED"),
        (128, [4096, 3000, 20], "LONG_DOCS"),
    ],
)
def test_triton_attention_with_rope_inside_against_fp32(head_dim, lens, tiles):
    # q and k before RoPE: the op rotates them, and the dQ/dK kernels rotate their gradients back.
    # The references apply RoPE (PyTorch's formula) before SDPA.
    _needs("triton")
    _check_triton_against_fp32(head_dim, torch.bfloat16, lens, tiles, rope=True)


def _check_triton_against_fp32(head_dim, dtype, lens, tiles, rope=False):
    from foundry_padfree import triton_attention
    from foundry_padfree.modeling import _apply_rope

    torch.manual_seed(0)
    T, K = sum(lens), 2
    N = 8 if tiles.endswith("_PACKED") else 4
    meta = BACKENDS["triton"].prepare(_meta(lens), N // K, head_dim)
    preset = getattr(triton_attention, tiles)
    assert meta.attn_extra.sizes == (triton_attention.WIDE_HEADS[preset] if head_dim > 64 else preset)
    q32, k32, v32 = (torch.randn(T, n, head_dim, device="cuda") for n in (N, K, K))
    grad_out = torch.randn(T, N, head_dim, device="cuda")
    freqs = meta.position_ids_T.float()[:, None] / 500000.0 ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim)
    cos32, sin32 = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()

    def run(name, dt):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in (q32, k32, v32))
        cos, sin = cos32.to(dt), sin32.to(dt)
        if rope and name == "triton":
            out = BACKENDS[name].attend_rope(q, k, v, cos, sin, meta, head_dim**-0.5)
        elif rope:
            out = BACKENDS[name].attend(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v, meta, head_dim**-0.5)
        else:
            out = BACKENDS[name].attend(q, k, v, meta, head_dim**-0.5)
        out.backward(grad_out.to(dt))
        return out, q.grad, k.grad, v.grad

    ref, pt, ours = run("sdpa", torch.float32), run("sdpa", dtype), run("triton", dtype)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, pt, ref):
        err, pt_err = _bound(o, p, r)
        print(f"triton H={head_dim} {dtype} {tiles}{' RoPE inside' if rope else ''} {what}: "
              f"max|ours-fp32|={err:.3e} max|torch-fp32|={pt_err:.3e}")  # fmt: skip
        assert err <= 2 * pt_err + 1e-5, (what, err, pt_err)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_model_logits_and_loss_in_bf16(backend):
    _needs(backend)
    reference = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024).cuda()  # fmt: skip
    B, S = 3, 600
    seq_id = torch.full((B, S), -1)
    for row, lens in enumerate([[300, 200, 50], [599], [1, 2, 3, 100]]):
        start = 0
        for k, n in enumerate(lens):
            seq_id[row, start : start + n] = k
            start += n
    seq_id = seq_id.cuda()
    ids = torch.randint(3, 97, (B, S), device="cuda")
    labels = ids.masked_fill(seq_id < 0, -100)
    real = seq_id >= 0

    def run(name, dtype):
        model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, attn_backend=name)  # fmt: skip
        model.load_state_dict(reference.state_dict())
        model = model.to("cuda", dtype)
        with torch.no_grad():
            out = model(ids, sequence_id=seq_id, labels=labels)
        return out.logits[real].float(), out.loss.float()

    ref_logits, ref_loss = run("sdpa", torch.float32)
    pt_logits, pt_loss = run("sdpa", torch.bfloat16)
    logits, loss = run(backend, torch.bfloat16)
    err, pt_err = _bound(logits, pt_logits, ref_logits)
    print(f"{backend} model logits: max|ours-fp32|={err:.3e} max|torch bf16-fp32|={pt_err:.3e}")
    print(f"{backend} model loss: ours {loss.item():.5f} torch bf16 {pt_loss.item():.5f} fp32 {ref_loss.item():.5f}")
    assert err <= 2 * pt_err + 1e-4
    assert abs(loss - ref_loss) <= 2 * abs(pt_loss - ref_loss) + 1e-3


def test_a_model_made_on_the_gpu_matches_one_moved_there():
    # Built under `with torch.device("cuda")`, as the benchmark builds its models, every tensor the
    # forward reads is on the GPU.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024)  # fmt: skip
    with torch.device("cuda"):
        made = tiny_model(**shape)
    moved = tiny_model(**shape)
    moved.load_state_dict(made.state_dict())
    moved.cuda()
    ids = torch.randint(3, 97, (2, 300), device="cuda")
    seq_id = torch.cat([torch.zeros(2, 100), torch.ones(2, 200)], dim=1).long().cuda()
    with torch.no_grad():
        torch.testing.assert_close(made(ids, sequence_id=seq_id).logits, moved(ids, sequence_id=seq_id).logits)


def _needs_triton() -> None:
    from foundry_padfree import kernels

    if not torch.cuda.is_available() or not kernels.usable(torch.zeros(1, device="cuda")):
        pytest.skip("the fused kernels need CUDA and Triton")


def _err_vs_fp32(fn, inputs32, grad32):
    """Max abs errors of fn's bf16 output and input gradients against fn on fp32 inputs."""

    def run(dtype):
        xs = [x.detach().to(dtype).requires_grad_(x.is_floating_point()) for x in inputs32]
        out = fn(*xs)
        grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], grad32.to(out.dtype))
        return [out, *grads]

    return run


@pytest.mark.parametrize("kernel", ["rms_norm", "rope", "silu_mul", "cross_entropy"])
def test_fused_kernels_at_llama_1b_sizes_against_fp32(kernel):
    # Ours: the Triton kernel in bf16. Theirs: the PyTorch formula in bf16. Both against fp32.
    _needs_triton()
    from foundry_padfree import kernels
    from foundry_padfree.loss import _nll_and_grad
    from foundry_padfree.modeling import _apply_rope, _RMSNorm, _SiluMul

    torch.manual_seed(0)
    T = 3000
    if kernel == "rms_norm":
        inputs = [torch.randn(T, 2048, device="cuda"), 1 + 0.1 * torch.randn(2048, device="cuda")]
        ours, theirs = (lambda x, w: kernels.rms_norm(x, w, 1e-5)), (lambda x, w: _RMSNorm.apply(x, w, 1e-5))
        grad = torch.randn(T, 2048, device="cuda")
    elif kernel == "rope":
        freqs = torch.arange(T, device="cuda")[:, None] * 500000.0 ** -(torch.arange(32, device="cuda") / 32)
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
        inputs = [torch.randn(T, 32, 64, device="cuda")]
        ours = lambda x: kernels.rope(x, cos.to(x.dtype), sin.to(x.dtype))  # noqa: E731
        theirs = lambda x: _apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))  # noqa: E731
        grad = torch.randn(T, 32, 64, device="cuda")
    elif kernel == "silu_mul":
        inputs = [2 * torch.randn(T, 8192, device="cuda"), torch.randn(T, 8192, device="cuda")]
        ours, theirs = (lambda g, u: _SiluMul.apply(g, u, True)), (lambda g, u: _SiluMul.apply(g, u, False))
        grad = torch.randn(T, 8192, device="cuda")
    else:
        V = 128256
        logits32, targets = 4 * torch.randn(512, V, device="cuda"), torch.randint(0, V, (512,), device="cuda")
        valid = torch.ones(512, device="cuda")
        ref_nll, ref_grad = _nll_and_grad(logits32, targets, valid, True)
        pt_nll, pt_grad = _nll_and_grad(logits32.bfloat16(), targets, valid, True)
        logits = logits32.bfloat16()
        nll = kernels.cross_entropy_grad_(logits, targets).sum()
        print(f"cross_entropy nll: ours {nll.item():.6f} torch bf16 {pt_nll.item():.6f} fp32 {ref_nll.item():.6f}")
        assert abs(nll - ref_nll) <= 2 * abs(pt_nll - ref_nll) + 1e-3 * abs(ref_nll)
        err, pt_err = _bound(logits, pt_grad, ref_grad)
        print(f"cross_entropy grad: max|ours-fp32|={err:.3e} max|torch bf16-fp32|={pt_err:.3e}")
        assert err <= 2 * pt_err + 1e-6
        return
    ref = _err_vs_fp32(theirs, inputs, grad)(torch.float32)
    pt = _err_vs_fp32(theirs, inputs, grad)(torch.bfloat16)
    mine = _err_vs_fp32(ours, inputs, grad)(torch.bfloat16)
    for i, (o, p, r) in enumerate(zip(mine, pt, ref)):
        err, pt_err = _bound(o, p, r.float())
        print(f"{kernel} output/grad {i}: max|ours-fp32|={err:.3e} max|torch bf16-fp32|={pt_err:.3e}")
        assert err <= 2 * pt_err + 1e-5, (i, err, pt_err)


def test_tied_embedding_grad_at_llama_1b_sizes_against_fp64():
    # Zipf-like ids over a 128k vocabulary: one id 2,000 times in 8k tokens, most rows none.
    _needs_triton()
    from foundry_padfree import kernels

    torch.manual_seed(0)
    V, D, T = 128256, 2048, 8192
    ranks = torch.distributions.Pareto(1.0, 1.0).sample((T,)).long().clamp(max=V) - 1
    ids = torch.randperm(V)[ranks].cuda()
    head, grad = torch.randn(V, D, device="cuda"), torch.randn(T, D, device="cuda").bfloat16()
    scale = torch.tensor(1 / 7000, device="cuda")
    ref = head.double() * scale.double()
    ref.index_add_(0, ids, grad.double())
    ours = kernels.tied_embedding_grad(head, scale, ids, grad, None, torch.bfloat16)
    # PyTorch's: the head's gradient cast, the dense embedding gradient, their sum in bf16.
    theirs = (head * scale).bfloat16() + torch.ops.aten.embedding_dense_backward(grad, ids, V, -1, False)
    err, pt_err = _bound(ours, theirs, ref)
    top = ids.bincount().max().item()
    print(f"tied embedding grad: max|ours-fp64|={err:.3e} max|torch bf16-fp64|={pt_err:.3e}; top id {top}x")
    assert err <= pt_err + 1e-6  # ours rounds once, theirs three times


@pytest.mark.parametrize("tied", [False, True], ids=["", "tied"])
@pytest.mark.parametrize("recompute_mlp", [False, True])
def test_training_step_on_the_fused_kernels_in_bf16(recompute_mlp, tied):
    _needs_triton()
    torch.manual_seed(0)
    lens = [1, 40, 300, 77, 600, 5]
    positions = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    ids = torch.randint(3, 97, positions.shape, device="cuda")
    labels = ids.clone()
    labels[0, 50:120] = -100
    shape = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024)  # fmt: skip
    reference = tiny_model(**shape, tie_word_embeddings=tied)

    def run(dtype, fused):
        backend = "sdpa" if dtype == torch.float32 else "auto"  # the varlen kernels take bf16/fp16 only
        model = tiny_model(**shape, attn_backend=backend, fused_kernels=fused, recompute_mlp=recompute_mlp,
                           tie_word_embeddings=tied).train()  # fmt: skip
        model.load_state_dict(reference.state_dict())
        model = model.to("cuda", dtype)
        loss = model(ids, position_ids=positions, labels=labels).loss
        loss.backward()
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run(torch.float32, False)
    pt_loss, pt_grads = run(torch.bfloat16, False)
    loss, grads = run(torch.bfloat16, True)
    print(f"loss: fused {loss.item():.5f} torch bf16 {pt_loss.item():.5f} fp32 {ref_loss.item():.5f}")
    assert abs(loss - ref_loss) <= 2 * abs(pt_loss - ref_loss) + 1e-3
    worst = 0.0
    for name, ref in ref_grads.items():
        err, pt_err = _bound(grads[name], pt_grads[name], ref)
        worst = max(worst, err / (pt_err + 1e-6))
        assert err <= 2 * pt_err + 1e-5, (name, err, pt_err)
    print(f"worst parameter-gradient error ratio fused/torch bf16: {worst:.2f}")


def _packed_batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    lens = [1, 40, 300, 77, 600, 5]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    ids = torch.randint(3, 97, positions.shape)
    labels = ids.clone()
    labels[0, 50:120] = -100
    return {k: v.to(device) for k, v in dict(input_ids=ids, position_ids=positions, labels=labels).items()}


def test_a_batch_left_on_the_host_trains_the_same_with_no_sync():
    _needs_triton()
    model = tiny_model(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024).train().to("cuda", torch.bfloat16)  # fmt: skip
    loss, grads = loss_and_grads(model, _packed_batch("cuda"))  # also compiles the kernels
    host = {k: v.pin_memory() for k, v in _packed_batch().items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        host_loss, host_grads = loss_and_grads(model, host)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(host_loss, loss, atol=0, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(host_grads[name], g, atol=0, rtol=0, msg=name)


def test_compiled_stack_with_the_attention_inside_matches_eager():
    _needs_triton()
    shape = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024)  # fmt: skip
    eager = tiny_model(**shape).train().to("cuda", torch.bfloat16)
    compiled = tiny_model(**shape).train().to("cuda", torch.bfloat16)
    compiled.compile_layers()
    torch._dynamo.utils.counters.clear()
    for batch in (_packed_batch("cuda"), {k: v[:, 7:900] for k, v in _packed_batch("cuda").items()}):
        loss, grads = loss_and_grads(eager, batch)
        c_loss, c_grads = loss_and_grads(compiled, batch)
        print(f"loss: eager {loss.item():.5f} compiled {c_loss.item():.5f}")
        torch.testing.assert_close(c_loss, loss, atol=2e-2, rtol=1e-2)
        for name, g in grads.items():  # inductor fuses and rounds differently: bf16 tolerance
            assert (c_grads[name].float() - g.float()).abs().max() <= 0.05 * g.float().abs().max() + 1e-3, name
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # the stack, the loss chunk


def test_compiled_layers_serve_a_batch_below_inductors_fusion_thresholds():
    # Hidden size 256: by default inductor fuses a norm backward's two reductions from 20,480
    # tokens on and guards on it, so an 8k-token batch after a 24k-token one compiled another
    # graph; `compile_layers` asks for its non-strict mode (torch >= 2.10), without those guards.
    from torch._inductor import config as inductor_config

    _needs_triton()
    if not hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
        pytest.skip("this torch's inductor has no mix-order reduction")
    torch._dynamo.reset()
    model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024).train().to("cuda", torch.bfloat16)  # fmt: skip
    model.compile_layers()
    counters = torch._dynamo.utils.counters
    counters.clear()
    graphs = []
    for tokens in (24_000, 8_000):
        positions = (torch.arange(tokens, device="cuda") % 500)[None]
        ids = torch.randint(3, 97, positions.shape, device="cuda")
        model(ids, position_ids=positions, labels=ids).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], graphs


def test_unpad_for_cuda_reads_a_host_batch_as_the_same_batch_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    batch = _packed_batch()
    on_gpu = unpad(batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), labels=batch["labels"].cuda())
    for device in ("cuda", torch.device("cuda", torch.cuda.current_device())):  # "cuda": the current one
        from_host = unpad(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], device=device)
        same_device = unpad(on_gpu.input_ids_T[None], device=device)  # a GPU batch for "cuda" is no error
        assert same_device.input_ids_T.device == on_gpu.input_ids_T.device
        for name in ("input_ids_T", "targets_T", "supervised_T"):
            assert torch.equal(getattr(from_host, name), getattr(on_gpu, name)), name
        for name in ("indices_T", "cu_seqlens_N1", "position_ids_T"):
            assert torch.equal(getattr(from_host.meta, name), getattr(on_gpu.meta, name)), name
        assert from_host.meta.doc_lens == on_gpu.meta.doc_lens
