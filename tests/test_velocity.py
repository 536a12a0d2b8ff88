"""Every base through ppsearch.flow.velocity: SiT-style velocity models as they are, DiT-style
epsilon models at the VP step whose SNR matches the flow's. The VP schedule is recomputed here
independently (DiT's gaussian_diffusion.py: linear betas, float64 numpy)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ppsearch.flow import (SolverConfig, flow_loss, interpolate, sample, velocity, vp_step, vp_time_range)
from ppsearch.models import PPFlowDiT, build_named, ppflow_variant
from ppsearch.schedule import Schedule

from conftest import randomized, tiny_config

ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
LOG_SNR = np.log(ALPHA_BAR / (1 - ALPHA_BAR))


def flow_time(step: int) -> float:
    """The flow time whose SNR t^2 / (1 - t)^2 equals VP step ``step``'s."""
    a = ALPHA_BAR[step]
    return math.sqrt(a) / (math.sqrt(a) + math.sqrt(1 - a))


def matched_step(t: float) -> float:
    """The fractional VP step of flow time t (log SNR linear between steps), t inside the range."""
    target = 2 * math.log(t / (1 - t))
    return float(np.interp(-target, -LOG_SNR, np.arange(1000)))


class ExactEpsilon(torch.nn.Module):
    """E[eps | x_k] for Gaussian data x1 ~ N(mu, s^2) under the VP process at step k, in closed
    form: what a perfectly trained DiT predicts for such data."""

    def __init__(self, mu, s):
        super().__init__()
        self.config = SimpleNamespace(num_classes=10, prediction="epsilon")
        self.mu, self.s, self.steps = mu, s, []

    def forward(self, x, step, y, patches=None, packed=False):
        self.steps.append(step.clone())
        log_snr = torch.from_numpy(np.interp(step.double().numpy(), np.arange(1000), LOG_SNR))
        a = torch.sigmoid(log_snr).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


def exact_velocity(x_t, t, mu, s):
    """E[x1 - x0 | x_t] for x1 ~ N(mu, s^2), x0 ~ N(0, 1), x_t = t x1 + (1 - t) x0."""
    t = t.double().view(-1, 1, 1, 1)
    var = t ** 2 * s ** 2 + (1 - t) ** 2
    return mu + (t * s ** 2 - (1 - t)) * (x_t.double() - t * mu) / var


def test_vp_steps_match_dit_schedule():
    low, high = vp_time_range()
    assert low == pytest.approx(flow_time(999), rel=1e-9) and high == pytest.approx(flow_time(0), rel=1e-9)
    steps = [0, 1, 17, 258, 500, 998, 999]
    got = vp_step(torch.tensor([flow_time(k) for k in steps]))
    torch.testing.assert_close(got, torch.tensor(steps, dtype=torch.float32), atol=2e-3, rtol=0)
    assert vp_step(torch.tensor([0.5])).item() == pytest.approx(matched_step(0.5), abs=1e-3)


def test_velocity_of_an_exact_epsilon_model_is_the_exact_velocity():
    mu, s = 0.7, 0.4
    model = ExactEpsilon(mu, s)
    t = torch.tensor([flow_time(k) for k in (3, 60, 258, 600, 990)], dtype=torch.float32)
    x_t = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = velocity(model, x_t, t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(v.double(), exact_velocity(x_t, t, mu, s), rtol=2e-4, atol=2e-4)
    # the network saw the matched steps and the input at the step's scale
    torch.testing.assert_close(model.steps[0], torch.tensor([3.0, 60, 258, 600, 990]), atol=2e-3, rtol=0)


def test_sampling_an_exact_epsilon_model_transports_noise_to_the_data():
    """For Gaussian data the flow's ODE maps noise z to mu + s z; sampling the exact DiT through
    the conversion must land there (Euler's error, and the clamped ends, aside)."""
    mu, s = 0.7, 0.4
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sample(ExactEpsilon(mu, s), Schedule.parse("2x2"), noise, torch.zeros(64, dtype=torch.long),
                 SolverConfig(steps=400, solver="heun"))
    assert (out - (mu + s * noise)).abs().max() < 2e-2


def _epsilon_model():
    torch.manual_seed(0)
    return randomized(PPFlowDiT(tiny_config(prediction="epsilon"))).eval()


def test_sampling_a_dit_base_follows_the_conversion_step_by_step():
    model = _epsilon_model()
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3])
    out = sample(model, Schedule.parse("2x2"), noise, y, SolverConfig(steps=5))
    x, times = noise.clone(), np.linspace(0, 1, 6)
    low, high = flow_time(999), flow_time(0)
    with torch.no_grad():
        for t0, t1 in zip(times[:-1], times[1:]):
            t = min(max(t0, low), high)
            step = torch.full((3,), matched_step(t))
            eps = model(x / math.sqrt(t ** 2 + (1 - t) ** 2), step, y)
            x = x + (t1 - t0) * (x - eps) / t
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_epsilon_loss_is_the_noise_mse_at_the_matched_step():
    model = ppflow_variant(_epsilon_model(), ["4x4"])
    schedule = Schedule.parse("4x4@0.5,2x2")
    x1, y = torch.randn(12, 3, 16, 16), torch.arange(12) % 10
    loss, t = flow_loss(model, x1, y, schedule, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same draws again
    t_again, x0 = torch.rand(12, generator=generator), torch.randn(x1.shape, generator=generator)
    assert torch.equal(t, t_again) and ((t > flow_time(999)) & (t < flow_time(0))).all()
    errors = []
    with torch.no_grad():
        for i, ti in enumerate(t.tolist()):
            x_t = interpolate(x0[i:i + 1], x1[i:i + 1], torch.tensor([ti]))
            eps = model(x_t / math.sqrt(ti ** 2 + (1 - ti) ** 2), torch.tensor([matched_step(ti)]), y[i:i + 1],
                        "4x4" if ti < 0.5 else "2x2")
            errors.append((eps - x0[i:i + 1]).square().mean())
    assert loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-4)


def test_velocity_models_are_called_with_flow_time():
    calls = []

    class Recorder(torch.nn.Module):
        config = SimpleNamespace(prediction="velocity")

        def forward(self, x, t, y, patches=None, packed=False):
            calls.append(t)
            return -x

    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.0, 0.3])
    torch.testing.assert_close(velocity(Recorder(), x, t, torch.zeros(2, dtype=torch.long)), -x)
    assert torch.equal(calls[0], t)


def test_official_names_build_models_that_know_what_they_predict():
    with torch.device("meta"):
        assert build_named("DiT-XL/2").config.prediction == "epsilon"
        assert build_named("SiT-XL/2").config.prediction == "velocity"
        assert build_named("XL/2").config.prediction == "velocity"
        dit512 = build_named("DiT-XL-2-512x512.pt")
    assert dit512.config.input_size == (64, 64) and dit512.config.depth == 28
    with pytest.raises(ValueError, match="unknown model 'XL/3'"):
        build_named("XL/3")
