"""Checks of the GPU speed switches; skipped on machines without CUDA (run by bench/gpu.sh)."""
import pytest
import torch

from ppsearch.flow import SolverConfig, fixed_noise, sample
from ppsearch.models import PPFlowDiT, _has_varlen_attention, ppflow_variant, varlen_attn
from ppsearch.schedule import Schedule

from conftest import randomized, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PPF3 = Schedule.parse("4x4@0.5:cfg1.0,2x4@0.75,2x2")


@pytest.fixture
def cuda_model():
    torch.manual_seed(0)
    model = ppflow_variant(randomized(PPFlowDiT(tiny_config(input_size=(32, 32)))), ["4x4", "2x4"])
    return model.cuda().eval()


def _run(model, config, batch=8):
    noise = fixed_noise(batch, (3, 32, 32), seed=0, device="cuda")
    y = torch.arange(batch, device="cuda") % 10
    return sample(model, PPF3, noise, y, config)


def test_packed_matches_grouped_on_cuda(cuda_model):
    shapes = ["4x4", "2x2", "2x4", "4x4", "2x2"]
    x = torch.randn(5, 3, 32, 32, device="cuda")
    t, y = torch.rand(5, device="cuda"), torch.arange(5, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(cuda_model(x, t, y, shapes, packed=True), cuda_model(x, t, y, shapes),
                                   rtol=1e-3, atol=1e-4)


def test_cuda_graphs_match_eager(cuda_model):
    eager = _run(cuda_model, SolverConfig(steps=6, guidance=2.0, solver="heun"))
    graphs = SolverConfig(steps=6, guidance=2.0, solver="heun", cuda_graphs=True)
    first, second = _run(cuda_model, graphs), _run(cuda_model, graphs)  # second call replays
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, second)


def test_bf16_is_close_to_fp32(cuda_model):
    full = _run(cuda_model, SolverConfig(steps=6, guidance=2.0))
    half = _run(cuda_model, SolverConfig(steps=6, guidance=2.0, bf16=True))
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_compile_matches_eager(cuda_model):
    eager = _run(cuda_model, SolverConfig(steps=4))
    torch.testing.assert_close(_run(cuda_model, SolverConfig(steps=4, compile=True)), eager, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(varlen_attn is None, reason="this PyTorch has no variable-length attention")
def test_varlen_packed_matches_grouped_in_bf16():
    """The packed path's CUDA kernel (one token stream, FlashAttention per sample): outputs and
    gradients as one pass per patch shape gives them, to bf16 rounding."""
    torch.manual_seed(0)
    model = ppflow_variant(randomized(PPFlowDiT(tiny_config(input_size=(32, 32), hidden_size=64))), ["4x4", "2x4"])
    model = model.cuda()
    model.y_embedder.dropout_prob = 0.0  # both passes see the same labels
    shapes = ["4x4", "2x2", "2x4", "4x4", "2x2", "2x4"]
    x = torch.randn(6, 3, 32, 32, device="cuda")
    t, y = torch.rand(6, device="cuda"), torch.arange(6, device="cuda")
    results = []
    for packed in (True, False):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert _has_varlen_attention(x, 16)
            out = model(x, t, y, shapes, packed=packed).float()
        (out ** 2).mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (packed_out, packed_grads), (grouped_out, grouped_grads) = results
    torch.testing.assert_close(packed_out, grouped_out, rtol=0.05, atol=0.02)
    assert len(packed_grads) == len(grouped_grads)
    for a, b in zip(packed_grads, grouped_grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6
