"""Analytic compute of PPFlow models, in multiply-accumulates (MACs).

DiT reports "GFLOPs" that are really GMACs (DiT-XL/2 at 256x256: 118.6); ppsearch follows
it and says GMACs. FLOPs = 2 x MACs. Counted: every matrix product and convolution of the
network (patch embedding, timestep MLP, adaLN modulations, attention projections, the two
attention products, MLPs, the head). Not counted: norms, activations, softmax, adds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .flow import SolverConfig, steps_per_stage
from .models import PPFlowConfig
from .schedule import PatchShape, Schedule


def forward_macs(config: PPFlowConfig, patch: PatchShape | str) -> int:
    """MACs of one forward pass of one sample at ``patch``."""
    patch = PatchShape.parse(patch)
    n, d, c = config.num_tokens(patch), config.hidden_size, config.in_channels
    freq = 256
    embed = n * patch.area * c * d + freq * d + d * d
    block = (
        6 * d * d                      # adaLN modulation
        + n * d * 3 * d                # qkv
        + 2 * n * n * d                # q k^T and attn v
        + n * d * d                    # attention output projection
        + 2 * n * d * config.mlp_hidden  # MLP
    )
    head = 2 * d * d + n * d * patch.area * c
    return embed + config.depth * block + head


@dataclass(frozen=True)
class StageCost:
    """Compute of one stage of a schedule, per generated sample."""

    patch: PatchShape
    t_start: float
    t_end: float
    steps: int
    guidance: float
    forwards: int       # network evaluations per sample, guidance passes included
    forward_macs: int   # one evaluation
    macs: int           # the stage in all

    def to_dict(self) -> dict:
        return {"patch": str(self.patch), "t_start": self.t_start, "t_end": self.t_end,
                "steps": self.steps, "guidance": self.guidance, "forwards": self.forwards,
                "gmacs_per_forward": self.forward_macs / 1e9, "gmacs": self.macs / 1e9}


@dataclass(frozen=True)
class SampleCost:
    """Compute of generating one sample under a schedule and sampler settings."""

    stages: tuple[StageCost, ...]
    decode_macs: int  # VAE decode, counted explicitly (0: left out)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.stages) + self.decode_macs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return 2 * self.macs / 1e9

    def to_dict(self) -> dict:
        return {"gmacs": self.gmacs, "gflops": self.gflops, "decode_gmacs": self.decode_macs / 1e9,
                "stages": [s.to_dict() for s in self.stages]}


def sample_cost(config: PPFlowConfig, schedule: Schedule, sampler: SolverConfig = SolverConfig(),
                decode_macs: int = 0) -> SampleCost:
    """MACs per generated sample: each step costs ``evals_per_step`` forwards, doubled where
    the stage's guidance scale is not 1 (the unconditional pass)."""
    schedule = schedule.with_guidance(sampler.guidance)
    stages = []
    for stage, steps in zip(schedule.stages, steps_per_stage(schedule, sampler.steps)):
        forwards = steps * sampler.evals_per_step * (1 if stage.guidance == 1.0 else 2)
        one = forward_macs(config, stage.patch)
        stages.append(StageCost(stage.patch, stage.t_start, stage.t_end, steps, stage.guidance,
                                forwards, one, forwards * one))
    return SampleCost(tuple(stages), decode_macs)


def relative_cost(config: PPFlowConfig, schedule: Schedule, sampler: SolverConfig = SolverConfig()) -> float:
    """Sampling MACs of ``schedule`` over the base model's (one stage at the base patch)."""
    base = Schedule.from_stages([config.base_patch])
    return sample_cost(config, schedule, sampler).macs / sample_cost(config, base, sampler).macs


def train_step_macs(config: PPFlowConfig, schedule, batch: int) -> float:
    """Expected MACs of one training step (forward + backward = 3 forwards) when t ~ U[0, 1)
    routes each sample to its stage (a schedule) or to a shape drawn among its time's (a warm
    start's mixture)."""
    per_sample = sum(share * forward_macs(config, patch) for patch, share in schedule.shares().items())
    return 3 * batch * per_sample
