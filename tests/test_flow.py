import math
from types import SimpleNamespace

import pytest
import torch

from ppsearch.flow import (NonFiniteLoss, SolverConfig, fixed_noise, flow_loss, interpolate, sample,
                           stage_patches, steps_per_stage, time_grid, train_step, update_ema)
from ppsearch.models import PPFlowDiT, ppflow_variant
from ppsearch.schedule import PatchShape, Schedule

from conftest import tiny_config

PPF3 = Schedule.parse("4x4@0.5,2x4@0.75,2x2")


class LinearField(torch.nn.Module):
    """dx/dt = -x (solution x0 * exp(-t)); records each call's batch size and patch."""

    def __init__(self, uncond_offset=0.0):
        super().__init__()
        self.config = SimpleNamespace(num_classes=10, prediction="velocity")
        self.calls = []
        self.uncond_offset = uncond_offset

    def forward(self, x, t, y, patches=None, packed=False):
        self.calls.append((x.shape[0], str(patches), t[0].item()))
        return -x + self.uncond_offset * (y == self.config.num_classes).float().view(-1, 1, 1, 1)


def test_interpolant_endpoints_and_target():
    x0, x1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(3)), x1)
    mid = interpolate(x0, x1, torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(mid[0], 0.25 * x1[0] + 0.75 * x0[0])


def test_steps_split_by_stage_length():
    assert steps_per_stage(PPF3, 100) == [50, 25, 25]
    assert sum(steps_per_stage(PPF3, 50)) == 50
    assert steps_per_stage(Schedule.parse("8x8@0.01,2x2"), 10) == [1, 9]
    assert steps_per_stage(PPF3, [3, 2, 1]) == [3, 2, 1]
    with pytest.raises(ValueError, match="cannot cover 3 stages"):
        steps_per_stage(PPF3, 2)
    with pytest.raises(ValueError, match="one positive step count per stage"):
        steps_per_stage(PPF3, [3, 2])
    grid = time_grid(PPF3, 8)
    assert [g[1][0].item() for g in grid] == [0.0, 0.5, 0.75] and grid[-1][1][-1].item() == 1.0


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solver_converges_at_its_order(solver, order):
    x0 = torch.randn(2, 1, 4, 4)
    exact = x0 * math.exp(-1)
    errors = []
    for steps in (8, 16, 32):
        out = sample(LinearField(), PPF3, x0, torch.zeros(2, dtype=torch.long), SolverConfig(steps=steps, solver=solver))
        errors.append((out - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2 ** order, rel=0.15)


def test_each_step_uses_its_stage_patch_and_guidance():
    model = LinearField(uncond_offset=1.0)
    schedule = Schedule.parse("4x4@0.5:cfg1.0,2x4@0.75:cfg3.0,2x2")
    x = torch.zeros(2, 1, 4, 4)
    out = sample(model, schedule, x, torch.zeros(2, dtype=torch.long), SolverConfig(steps=8, guidance=2.0))
    assert [(n, p) for n, p, _ in model.calls] == [(2, "4x4")] * 4 + [(4, "2x4")] * 2 + [(4, "2x2")] * 2
    assert all(0.5 <= t < 0.75 for _, p, t in model.calls if p == "2x4")
    # v = u + s (c - u) with c - u = -1 from the offset: x = 0 stays 0 in stage 1, then moves
    # by -(1 - s) dt per step in guided stages: 2 steps of 0.125 at s=3 and s=2.
    expected = 0.0
    for scale, dt in [(3.0, 0.125)] * 2 + [(2.0, 0.125)] * 2:
        expected = expected + dt * (-expected + 1.0 - scale)
    torch.testing.assert_close(out, torch.full_like(out, expected))


def test_heun_corrector_stays_in_stage():
    model = LinearField()
    sample(model, PPF3, torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), SolverConfig(steps=4, solver="heun"))
    assert [(p, t) for _, p, t in model.calls] == [
        ("4x4", 0.0), ("4x4", 0.25), ("4x4", 0.25), ("4x4", 0.5), ("2x4", 0.5), ("2x4", 0.75), ("2x2", 0.75), ("2x2", 1.0)]


def test_sampling_is_deterministic_under_a_seed(tiny_model):
    model = ppflow_variant(tiny_model, ["4x4", "2x4"])
    noise = fixed_noise(4, (3, 16, 16), seed=7)
    assert torch.equal(noise, fixed_noise(4, (3, 16, 16), seed=7))
    y = torch.arange(4)
    config = SolverConfig(steps=6, guidance=1.5)
    first = sample(model, PPF3, noise, y, config)
    assert torch.equal(first, sample(model, PPF3, noise, y, config))
    assert first.shape == noise.shape and torch.isfinite(first).all()


def test_loss_routes_each_sample_to_its_stage(tiny_model):
    model = ppflow_variant(tiny_model, ["4x4", "2x4"])
    seen = {}
    for name, level in model.levels.items():
        level.x_embedder.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    loss, t = flow_loss(model, torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long), PPF3, generator=g)
    assert seen == {"4x4": int((t < 0.5).sum()), "2x4": int(((t >= 0.5) & (t < 0.75)).sum()), "2x2": int((t >= 0.75).sum())}
    assert [s.patch for s in PPF3.stages] == [PatchShape(4, 4), PatchShape(2, 4), PatchShape(2, 2)]
    assert stage_patches(PPF3, torch.tensor([0.1, 0.6, 0.9])) == [PatchShape(4, 4), PatchShape(2, 4), PatchShape(2, 2)]
    assert loss.ndim == 0 and loss.item() > 0


def test_train_step_fits_a_batch_and_ema_follows(tiny_model):
    torch.manual_seed(0)
    model = ppflow_variant(PPFlowDiT(tiny_config()), ["4x4"]).train()
    schedule = Schedule.parse("4x4@0.5,2x2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x1, y = torch.randn(1, 3, 16, 16).sign().expand(16, -1, -1, -1), torch.zeros(16, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    losses = [train_step(model, optimizer, x1, y, schedule, generator=g, packed=True) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # one data point: the flow is learnable
    ema = ppflow_variant(PPFlowDiT(tiny_config()), ["4x4"])
    before = ema.blocks[0].attn.qkv.weight.clone()
    update_ema(ema, model, 0.5)
    torch.testing.assert_close(ema.blocks[0].attn.qkv.weight, 0.5 * before + 0.5 * model.blocks[0].attn.qkv.weight)


def test_nan_loss_is_an_error(tiny_model):
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    x1 = torch.full((2, 3, 16, 16), float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train_step(tiny_model, optimizer, x1, torch.zeros(2, dtype=torch.long), Schedule.parse("2x2"))


def test_bf16_autocast_switch_runs(tiny_model):
    noise = fixed_noise(2, (3, 16, 16), seed=0)
    out = sample(tiny_model, Schedule.parse("2x2"), noise, torch.zeros(2, dtype=torch.long),
                 SolverConfig(steps=2, bf16=True))
    full = sample(tiny_model, Schedule.parse("2x2"), noise, torch.zeros(2, dtype=torch.long), SolverConfig(steps=2))
    assert out.dtype == torch.float32 and (out - full).abs().max() < 0.1
