"""GPU kernels against the fp32 reference, with flash-attn's relative-tolerance rule: a bf16 kernel
may be off the fp32 reference by at most twice what PyTorch's own bf16 attention is off by."""

from __future__ import annotations

import pytest
import torch

from foundry_padfree.attention import BACKENDS, available_backends
from foundry_padfree.varlen import unpad
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["torch_varlen", "flex", "flash_attn"]
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
    meta = BACKENDS[backend].prepare(_meta(DOC_LENS))
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
