"""Flow matching with stages: interpolant, the velocity of any base, loss, stage-routed
training step, and an ODE sampler (Euler or Heun) whose steps use their stage's patch shape
and guidance.

Time runs from t = 0 (noise x0) to t = 1 (data x1): x_t = t * x1 + (1 - t) * x0, and the
velocity is x1 - x0. Every base is used through :func:`velocity`, whatever it predicts: SiT and
ppsearch's own models predict the velocity; a DiT predicts the noise on its discrete VP schedule,
run at the step whose signal-to-noise ratio equals the flow's.
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PPSearchError
from .schedule import PatchShape, Schedule


def interpolate(x0, x1, t):
    """x_t for noise ``x0``, data ``x1`` and per-sample times ``t``."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1 - t) * x0


def velocity_target(x0, x1):
    return x1 - x0


def stage_patches(schedule: Schedule, t: torch.Tensor) -> list[PatchShape]:
    """The patch shape each sample's time routes it to."""
    return [schedule.stages[i].patch for i in schedule.stage_index(t).tolist()]


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on ``device`` when asked, a no-op otherwise."""
    device_type = torch.device(device).type
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


#################################################################################
#                       The velocity of any base (SiT or DiT)                   #
#################################################################################

# DiT's diffusion (facebookresearch/DiT, diffusion/gaussian_diffusion.py): linear betas from
# 1e-4 to 0.02 over 1,000 steps; step 0 is nearly data, step 999 nearly noise.
VP_STEPS, VP_BETA_START, VP_BETA_END = 1000, 1e-4, 0.02


@functools.cache
def _vp_log_snr() -> torch.Tensor:
    """log(alpha_bar / (1 - alpha_bar)) of each VP step, decreasing with the step."""
    betas = torch.linspace(VP_BETA_START, VP_BETA_END, VP_STEPS, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    return torch.log(alpha_bar / (1 - alpha_bar))


@functools.cache
def _vp_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-log SNR of each step (increasing) and the step numbers, on ``device`` (made once, before a
    CUDA graph captures a sampling step)."""
    log_snr = _vp_log_snr()
    return (-log_snr).float().to(device), torch.arange(VP_STEPS, dtype=torch.float32, device=device)


def vp_time_range() -> tuple[float, float]:
    """Flow times of VP steps 999 and 0: the flow's SNR t^2 / (1 - t)^2 equals a VP step's inside
    this range only; times outside are clamped to it."""
    log_snr = _vp_log_snr()
    return torch.sigmoid(log_snr[-1] / 2).item(), torch.sigmoid(log_snr[0] / 2).item()


def vp_step(t: torch.Tensor) -> torch.Tensor:
    """The fractional VP step whose SNR equals the flow's at time ``t`` (inside ``vp_time_range``):
    log SNR interpolated linearly between integer steps."""
    neg_log_snr, steps = _vp_table(t.device)
    target = -2 * torch.logit(t.float())
    upper = torch.searchsorted(neg_log_snr, target).clamp(1, VP_STEPS - 1)
    low, high = neg_log_snr[upper - 1], neg_log_snr[upper]
    return steps[upper - 1] + ((target - low) / (high - low)).clamp(0, 1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def velocity(model, x_t, t, labels, patch=None, packed=False) -> torch.Tensor:
    """The flow velocity the base predicts at ``x_t``, flow times ``t`` (one per sample) and
    ``labels``, under ``patch`` (one for the batch or one per sample), in float32.

    A velocity model (SiT, ppsearch's own) is fed t itself. An epsilon model (DiT) runs at the VP
    step with the flow's signal-to-noise ratio, on the input rescaled to that step's scale,
    x_t / sqrt(t^2 + (1 - t)^2); its noise eps becomes v = (x_t - eps) / t. Times beyond the
    VP schedule's ends (t below 0.0064 or above 0.990) are clamped to its first and last steps.
    """
    if model.config.prediction == "velocity":
        return model(x_t, t, labels, patch, packed=packed).float()
    t = t.clamp(*vp_time_range())
    scale = torch.rsqrt(t.square() + (1 - t).square())
    eps = model(x_t * _per_sample(scale, x_t).to(x_t.dtype), vp_step(t), labels, patch, packed=packed).float()
    return (x_t.float() - eps) / _per_sample(t, x_t).float()


def loss_weights(model, t) -> torch.Tensor:
    """Per-sample weights of the velocity MSE. A velocity base: 1. An epsilon base keeps its
    pretrained meaning and objective: with v = (x_t - eps) / t, t^2 |v_pred - v|^2 is the noise
    MSE at the matched VP step, whose weight stays bounded where 1 / t^2 would not (t -> 0)."""
    if model.config.prediction == "velocity":
        return torch.ones_like(t)
    return t.clamp(*vp_time_range()).square()


def flow_loss(model, x1, y, schedule: Schedule, generator=None, packed=False, bf16=False):
    """Velocity MSE (weighted by :func:`loss_weights`) with t ~ U[0, 1) and each sample routed
    to its stage's patch shape.

    Returns the mean loss and the per-sample times (for per-stage statistics).
    """
    t = torch.rand(x1.shape[0], device=x1.device, generator=generator)
    x0 = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=x1.dtype)
    return sample_losses(model, x1, y, t, x0, stage_patches(schedule, t), packed, bf16).mean(), t


def sample_losses(model, x1, y, t, x0, patches: list[PatchShape], packed=False, bf16=False) -> torch.Tensor:
    """Each sample's velocity MSE (weighted by :func:`loss_weights`) at its time ``t`` and noise
    ``x0``, through its patch shape in ``patches``."""
    with autocast(x1.device, bf16):
        v = velocity(model, interpolate(x0, x1, t), t, y, patches, packed=packed)
    return loss_weights(model, t) * (v - velocity_target(x0, x1).float()).square().flatten(1).mean(1)


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def train_step(model, optimizer, x1, y, schedule: Schedule, generator=None, packed=False, bf16=False,
               grad_clip: float | None = None) -> float:
    """One optimiser step of stage-routed flow matching; returns the loss."""
    model.train()
    loss, _ = flow_loss(model, x1, y, schedule, generator, packed, bf16)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"non-finite training loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)


#################################################################################
#                                     Sampling                                  #
#################################################################################

@dataclass(frozen=True)
class SolverConfig:
    """ODE solver settings. ``steps``: total steps (split over stages in proportion to their
    length, at least one each) or a list with one count per stage."""

    steps: int | tuple[int, ...] = 50
    solver: str = "euler"  # "euler" or "heun"
    guidance: float = 1.0  # for stages whose guidance the schedule leaves open
    bf16: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise PPSearchError(f"solver must be 'euler' or 'heun', got {self.solver!r}")
        if not isinstance(self.steps, int):
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    @property
    def evals_per_step(self) -> int:
        return 2 if self.solver == "heun" else 1


def steps_per_stage(schedule: Schedule, steps: int | Sequence[int]) -> list[int]:
    """Steps of each stage: given per stage, or a total split in proportion to stage length
    (largest remainder, at least one step each)."""
    n = len(schedule.stages)
    if not isinstance(steps, int):
        steps = list(steps)
        if len(steps) != n or min(steps) < 1:
            raise PPSearchError(f"need one positive step count per stage ({n}), got {steps}")
        return steps
    if steps < n:
        raise PPSearchError(f"{steps} steps cannot cover {n} stages (at least one step each)")
    exact = [steps * s.length for s in schedule.stages]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(n), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: steps - sum(counts)]:
        counts[i] += 1
    while min(counts) == 0:  # a very short stage still gets a step, taken from the longest
        counts[counts.index(max(counts))] -= 1
        counts[counts.index(0)] = 1
    return counts


def time_grid(schedule: Schedule, steps) -> list[tuple[int, torch.Tensor]]:
    """(stage index, times from t_start to t_end) for each stage."""
    return [
        (i, torch.linspace(stage.t_start, stage.t_end, n + 1, dtype=torch.float64))
        for i, (stage, n) in enumerate(zip(schedule.stages, steps_per_stage(schedule, steps)))
    ]


class _Velocity:
    """Guided velocity of one stage: v_u + s (v_c - v_u), with the unconditional pass
    skipped where s = 1."""

    def __init__(self, model, patch: PatchShape, scale: float, bf16: bool):
        self.model, self.patch, self.scale, self.bf16 = model, patch, scale, bf16

    def __call__(self, x, t, y):
        guided = self.scale != 1.0
        if guided:
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.model.config.num_classes)])
        with autocast(x.device, self.bf16):
            out = velocity(self.model, x, t, y, self.patch)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


class _GraphedVelocity(_Velocity):
    """The same, captured once as a CUDA graph and replayed on static input buffers."""

    def __call__(self, x, t, y):
        if not hasattr(self, "graph"):
            self._capture(x, t, y)
        for static, value in zip(self.static_in, (x, t, y)):
            static.copy_(value)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites the output buffer

    def _capture(self, x, t, y):
        self.static_in = (x.clone(), t.clone(), y.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # CUDA graphs need a warm-up on a side stream
                super().__call__(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = super().__call__(*self.static_in)


_compiled = weakref.WeakKeyDictionary()
_graphed = weakref.WeakKeyDictionary()


def compiled(model):
    """``torch.compile(model)``, made once per model (one graph per patch shape)."""
    if model not in _compiled:
        _compiled[model] = torch.compile(model)
    return _compiled[model]


def _velocity(model, net, patch, scale, x, config: SolverConfig) -> _Velocity:
    """The stage's velocity function; CUDA graphs are kept per model and input shape."""
    if not config.cuda_graphs:
        return _Velocity(net, patch, scale, config.bf16)
    graphs = _graphed.setdefault(model, {})
    key = (patch, scale, tuple(x.shape), x.device, config.bf16, config.compile)
    if key not in graphs:
        graphs[key] = _GraphedVelocity(net, patch, scale, config.bf16)
    return graphs[key]


@torch.no_grad()
def sample(model, schedule: Schedule, noise, y, config: SolverConfig = SolverConfig()):
    """Integrate the probability-flow ODE from ``noise`` (t = 0) to data (t = 1).

    Each step uses the patch shape and guidance of the stage it lies in; Heun's corrector
    stays in the step's stage. Deterministic given ``noise``.
    """
    model.eval()
    net = compiled(model) if config.compile else model
    schedule = schedule.with_guidance(config.guidance)
    x = noise.float()
    for index, grid in time_grid(schedule, config.steps):
        stage = schedule.stages[index]
        velocity = _velocity(model, net, stage.patch, stage.guidance, x, config)
        for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
            dt = t1 - t0
            v0 = velocity(x, x.new_full((x.shape[0],), t0), y)
            if config.solver == "euler":
                x = x + dt * v0
            else:
                x_pred = x + dt * v0
                v1 = velocity(x_pred, x.new_full((x.shape[0],), t1), y)
                x = x + dt * 0.5 * (v0 + v1)
    return x


def fixed_noise(num, shape, seed, device="cpu"):
    """Noise drawn from a fixed seed, the same on every trial (common random numbers)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=generator).to(device)
