"""The warm start: one variant of the base holding every patch shape of a search space,
fine-tuned once per study over the whole time axis with each sample routed to a shape drawn
uniformly among those the space allows at its time. Every trial of the study then starts from
it (its own shapes' levels kept, the others dropped) and fine-tunes fewer steps than it would
from the base.

A :class:`Mixture` is the warm start's routing, written like a schedule whose stages list their
shapes with ``|``: ``8x8|4x4|2x4|4x2|2x2@0.9,2x2`` (any of five shapes below t = 0.9, the base
patch above). ``ppsearch.train`` trains a mixture as it trains a schedule."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .config import TrainerConfig
from .flops import train_step_macs
from .schedule import PatchShape, Schedule, ScheduleError
from .space import SearchSpace


@dataclass(frozen=True)
class Mixture:
    intervals: tuple[tuple[tuple[PatchShape, ...], float], ...]  # (shapes, t_end), t_end increasing to 1

    @classmethod
    def of_space(cls, space: SearchSpace) -> Mixture:
        return cls(tuple((tuple(shapes), end) for shapes, end in space.shapes_by_time()))

    @classmethod
    def parse(cls, text: str) -> Mixture:
        intervals = []
        for part in text.split(","):
            shapes, _, end = part.strip().partition("@")
            try:
                intervals.append((tuple(PatchShape.parse(s) for s in shapes.split("|")), float(end) if end else 1.0))
            except ValueError:
                raise ScheduleError(f"cannot read {part!r} of the mixture {text!r}") from None
        if intervals[-1][1] != 1.0 or any(b >= a for (_, a), (_, b) in zip(intervals[1:], intervals)):
            raise ScheduleError(f"the mixture {text!r} must end at 1 with increasing times")
        return cls(tuple(intervals))

    def __str__(self) -> str:
        return ",".join("|".join(map(str, shapes)) + ("" if end == 1.0 else f"@{end!r}")
                        for shapes, end in self.intervals)

    @property
    def patch_shapes(self) -> list[PatchShape]:
        return list(dict.fromkeys(p for shapes, _ in self.intervals for p in shapes))

    def shares(self) -> dict[PatchShape, float]:
        """The share of training samples (t ~ U[0, 1)) each patch shape takes."""
        out, start = {}, 0.0
        for shapes, end in self.intervals:
            for patch in shapes:
                out[patch] = out.get(patch, 0.0) + (end - start) / len(shapes)
            start = end
        return out

    def check_for(self, latent_size, base_patch=None) -> None:
        for patch in self.patch_shapes:
            Schedule.from_stages([patch]).check_for(latent_size, base_patch)

    def patches(self, t: torch.Tensor, generator: torch.Generator) -> list[PatchShape]:
        """Each sample's shape: drawn uniformly (with ``generator``) among those allowed at its time."""
        ends = torch.tensor([end for _, end in self.intervals[:-1]], dtype=t.dtype)
        which = torch.bucketize(t.cpu(), ends, right=True).tolist()
        draws = torch.rand(len(which), generator=generator).tolist()
        return [self.intervals[i][0][int(u * len(self.intervals[i][0]))] for i, u in zip(which, draws)]


def routing(text: str) -> Schedule | Mixture:
    """What a training's ``schedule`` text routes samples with: a mixture (``|`` in it) or a schedule."""
    return Mixture.parse(text) if "|" in text else Schedule.parse(text)


def warm_trainer(trainer: TrainerConfig, steps: int) -> TrainerConfig:
    """The warm start's training settings: the trial's, for ``steps`` steps, weights kept to resume."""
    return replace(trainer, steps=steps, keep_train_state=True, eval_at_end=False, eval_every=0, progress=False)


def run_warm_start(trainer: TrainerConfig, mixture: str, out_dir: str, shared=None) -> dict:
    """Fine-tune ``trainer``'s base under ``mixture`` into ``out_dir`` (or return what is already
    there): the warm start's EMA weights, with its loss and time. A worker runs it as a trial."""
    from .train import train

    base = None if shared is None else shared.get("base")
    config = replace(trainer, schedule=mixture, out_dir=out_dir)
    done = train(config, log=lambda line: None, base=None if base is None else copy.deepcopy(base))
    macs = train_step_macs(done.model.config, Mixture.parse(mixture), config.batch_size) * (done.steps - done.resumed_from)
    return {"model": done.model.cpu().requires_grad_(True).train(), "final_loss": done.final_loss, "losses": done.losses,
            "seconds": done.seconds, "steps": done.steps, "checkpoint": done.checkpoint, "train_gmacs": macs / 1e9}
