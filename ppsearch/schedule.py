"""Patch schedules: which patch shape and guidance scale each stage of the time axis uses.

Text form (used by the CLI, configs, exports and the database)::

    schedule := stage ("," stage)*
    stage    := PH "x" PW ["@" T_END] [":cfg" SCALE]

Every stage but the last names the time ``T_END`` where it ends; the last one ends at
t = 1. ``4x4@0.5,2x4@0.75,2x2`` is the paper's PPF-3, ``2x2`` the original model.
``:cfgS`` fixes the stage's classifier-free guidance scale; without it the stage uses
the sampler's default scale. Time runs from t = 0 (noise) to t = 1 (data).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .errors import PPSearchError


class ScheduleError(PPSearchError):
    """A schedule that cannot be used, with the reason in the message."""


@dataclass(frozen=True, order=True)
class PatchShape:
    """A patch of ``h`` x ``w`` latent pixels."""

    h: int
    w: int

    @classmethod
    def parse(cls, text: str | Sequence[int] | PatchShape) -> PatchShape:
        if isinstance(text, PatchShape):
            return text
        if not isinstance(text, str):
            if len(text) != 2:
                raise ScheduleError(f"a patch shape has two sides, got {list(text)!r}")
            return cls._checked(int(text[0]), int(text[1]))
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not match:
            raise ScheduleError(f"bad patch shape {text!r}: expected PHxPW, e.g. 2x2 or 4x2")
        return cls._checked(int(match[1]), int(match[2]))

    @classmethod
    def _checked(cls, h: int, w: int) -> PatchShape:
        if h < 1 or w < 1:
            raise ScheduleError(f"patch sides must be positive, got {h}x{w}")
        return cls(h, w)

    @property
    def area(self) -> int:
        return self.h * self.w

    def __str__(self) -> str:
        return f"{self.h}x{self.w}"


@dataclass(frozen=True)
class Stage:
    """Times [t_start, t_end) sampled with one patch shape and one guidance scale."""

    patch: PatchShape
    t_start: float
    t_end: float
    guidance: float | None = None  # None: the sampler's default scale

    @property
    def length(self) -> float:
        return self.t_end - self.t_start


_STAGE = re.compile(
    r"(?P<patch>\d+x\d+)(?:@(?P<t_end>[^:@,]+))?(?::cfg(?P<cfg>[^:@,]+))?"
)


def _number(text: str, what: str, stage_text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"bad {what} {text!r} in stage {stage_text!r}") from None
    if not math.isfinite(value):
        raise ScheduleError(f"{what} must be finite in stage {stage_text!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages covering [0, 1]; patch area never grows as t grows."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ScheduleError("a schedule needs at least one stage")
        if stages[0].t_start != 0.0 or stages[-1].t_end != 1.0:
            raise ScheduleError("a schedule must cover time from 0 to 1")
        for before, after in zip(stages, stages[1:]):
            if before.t_end != after.t_start:
                raise ScheduleError(f"stages must be contiguous: {before.t_end} then {after.t_start}")
        for stage in stages:
            if not 0.0 <= stage.t_start < stage.t_end <= 1.0:
                raise ScheduleError(
                    "stage boundaries must increase strictly inside (0, 1), got "
                    + ", ".join(repr(s.t_end) for s in stages[:-1])
                )
            if stage.guidance is not None and not (math.isfinite(stage.guidance) and stage.guidance >= 0):
                raise ScheduleError(f"guidance scale must be finite and >= 0, got {stage.guidance!r}")
        for before, after in zip(stages, stages[1:]):
            if after.patch.area > before.patch.area:
                raise ScheduleError(
                    f"patch area must not grow with t: {before.patch} ({before.patch.area}) "
                    f"before {after.patch} ({after.patch.area})"
                )

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_stages(cls, patches: Iterable, boundaries: Iterable[float] = (),
                    guidance: Iterable[float | None] | None = None) -> Schedule:
        """Build from patch shapes, the inner boundaries and optional per-stage guidance."""
        patches = [PatchShape.parse(p) for p in patches]
        boundaries = [float(b) for b in boundaries]
        if len(boundaries) != len(patches) - 1:
            raise ScheduleError(
                f"{len(patches)} stages need {len(patches) - 1} boundaries, got {len(boundaries)}"
            )
        guidance = list(guidance) if guidance is not None else [None] * len(patches)
        if len(guidance) != len(patches):
            raise ScheduleError(f"{len(patches)} stages need {len(patches)} guidance scales, got {len(guidance)}")
        edges = [0.0, *boundaries, 1.0]
        for inner in boundaries:
            if not 0.0 < inner < 1.0:
                raise ScheduleError(f"stage boundary {inner!r} is not inside (0, 1)")
        return cls(tuple(
            Stage(p, edges[i], edges[i + 1], None if g is None else float(g))
            for i, (p, g) in enumerate(zip(patches, guidance))
        ))

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Read the text form, e.g. ``4x4@0.5:cfg1.0,2x4@0.75,2x2``."""
        if not isinstance(text, str) or not text.strip():
            raise ScheduleError("empty schedule text: expected e.g. 4x4@0.5,2x2")
        parts = [p.strip() for p in text.split(",")]
        patches, boundaries, guidance = [], [], []
        for i, part in enumerate(parts):
            match = _STAGE.fullmatch(part.replace(" ", ""))
            if not match:
                raise ScheduleError(
                    f"cannot read stage {part!r} of {text!r}: expected PHxPW[@T_END][:cfgSCALE]"
                )
            last = i == len(parts) - 1
            if last and match["t_end"] is not None:
                raise ScheduleError(f"the last stage {part!r} ends at 1 and takes no @T_END")
            if not last and match["t_end"] is None:
                raise ScheduleError(f"stage {part!r} needs @T_END (only the last stage ends at 1)")
            patches.append(PatchShape.parse(match["patch"]))
            if not last:
                boundaries.append(_number(match["t_end"], "boundary", part))
            guidance.append(None if match["cfg"] is None else _number(match["cfg"], "guidance", part))
        if any(b >= a for a, b in zip(boundaries[1:], boundaries)):
            raise ScheduleError(f"stage boundaries must increase strictly, got {boundaries}")
        return cls.from_stages(patches, boundaries, guidance)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Read the dict/YAML form written by :meth:`to_dict`."""
        try:
            stages = data["stages"]
            return cls.from_stages(
                [s["patch"] for s in stages],
                [s["t_end"] for s in stages[:-1]],
                [s.get("guidance") for s in stages],
            )
        except (KeyError, TypeError) as err:
            raise ScheduleError(f"bad schedule mapping {data!r}: missing or malformed {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [
            {"patch": str(s.patch), "t_start": s.t_start, "t_end": s.t_end, "guidance": s.guidance}
            for s in self.stages
        ]}

    def __str__(self) -> str:
        parts = []
        for stage in self.stages:
            text = str(stage.patch)
            if stage.t_end != 1.0:
                text += f"@{stage.t_end!r}"
            if stage.guidance is not None:
                text += f":cfg{stage.guidance!r}"
            parts.append(text)
        return ",".join(parts)

    # -- queries -------------------------------------------------------------------
    @property
    def patch_shapes(self) -> list[PatchShape]:
        """Distinct patch shapes, coarsest first."""
        return list(dict.fromkeys(s.patch for s in self.stages))

    def shares(self) -> dict[PatchShape, float]:
        """The share of training samples (t ~ U[0, 1)) each patch shape takes."""
        out: dict[PatchShape, float] = {}
        for stage in self.stages:
            out[stage.patch] = out.get(stage.patch, 0.0) + stage.length
        return out

    @property
    def boundaries(self) -> list[float]:
        return [s.t_end for s in self.stages[:-1]]

    def stage_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the stage each time in ``t`` falls into (stages are half-open)."""
        edges = torch.tensor(self.boundaries, dtype=t.dtype, device=t.device)
        return torch.bucketize(t, edges, right=True)

    def stage_at(self, t: float) -> Stage:
        return self.stages[int(self.stage_index(torch.tensor([float(t)], dtype=torch.float64))[0])]

    def with_guidance(self, scale: float | None) -> Schedule:
        """The same stages, with ``scale`` wherever a stage leaves guidance to the sampler."""
        return Schedule(tuple(
            Stage(s.patch, s.t_start, s.t_end, scale if s.guidance is None else s.guidance)
            for s in self.stages
        ))

    def check_for(self, latent_size: tuple[int, int], base_patch: PatchShape | None = None) -> None:
        """Raise ScheduleError unless every stage fits a latent of ``latent_size`` (H, W) and
        can be initialised from a base trained with ``base_patch``."""
        height, width = latent_size
        for patch in self.patch_shapes:
            if height % patch.h or width % patch.w:
                raise ScheduleError(
                    f"patch {patch} does not divide the {height}x{width} latent"
                )
            if base_patch is not None and (patch.h % base_patch.h or patch.w % base_patch.w):
                raise ScheduleError(
                    f"patch {patch} cannot be initialised from the base patch {base_patch}: "
                    f"its sides must be multiples of the base's"
                )
