"""The search space: Optuna parameters <-> schedules, every proposal valid by construction.

For a stage count n (parameter ``stages``):
- patches: ``patch_i`` for the n - 1 free stages (n when the last is not pinned to the base
  patch), each from the same fixed list; the stages take them coarsest first, so patch area
  never grows with t, whatever was drawn.
- boundaries: ``boundary_i`` for i < n - 1, times on the boundary grid (floats with the grid's
  step, so Optuna's views show them as times); taken in increasing order and pushed apart to
  distinct grid points, so they always increase strictly inside (0, 1).
- guidance: ``cfg_i`` per stage from the allowed scales (absent when there is only one); a
  scale equal to the evaluation's default is left to the sampler (no ``:cfg`` in the text).
Adjacent stages that end up with the same patch and guidance are merged, so equal schedules
have equal text and the driver can tell repeats from new ones.
"""
from __future__ import annotations

from .errors import PPSearchError
from .config import SearchSpaceConfig
from .schedule import PatchShape, Schedule, ScheduleError, Stage


class SearchSpaceError(PPSearchError):
    """A search space that cannot produce a valid schedule for this base."""


class SearchSpace:
    def __init__(self, config: SearchSpaceConfig, base_patch: PatchShape, latent_size: tuple[int, int],
                 default_guidance: float = 1.0):
        self.config, self.base_patch, self.default_guidance = config, base_patch, default_guidance
        self.patches = []
        for text in config.patch_shapes:
            patch = PatchShape.parse(text)
            try:
                Schedule.from_stages([patch]).check_for(latent_size, base_patch)
            except ScheduleError as err:
                raise SearchSpaceError(f"search_space.patch_shapes: {err}") from None
            self.patches.append(patch)
        self.free_patches = [str(p) for p in self.patches if not (config.pin_last_to_base and p == base_patch)]
        count = round((config.boundary_max - config.boundary_min) / config.boundary_step) + 1
        self.grid = [round(config.boundary_min + k * config.boundary_step, 10) for k in range(count)]
        if not self.grid or not 0 < self.grid[0] <= self.grid[-1] < 1:
            raise SearchSpaceError(f"the boundary grid {config.boundary_min}..{config.boundary_max} step "
                                   f"{config.boundary_step} must lie inside (0, 1)")
        if not config.stage_counts or min(config.stage_counts) < 1 or max(config.stage_counts) - 1 > len(self.grid):
            raise SearchSpaceError(f"search_space.stage_counts {config.stage_counts} must be >= 1 and at most "
                                   f"one more than the {len(self.grid)} grid boundaries")
        if max(config.stage_counts) > 1 and not self.free_patches:
            raise SearchSpaceError("search_space.patch_shapes leaves no patch for the stages before the last")
        if not config.guidance_scales:
            raise SearchSpaceError("search_space.guidance_scales is empty")

    def _free_stages(self, n: int) -> int:
        return n - 1 if self.config.pin_last_to_base else n

    def suggest(self, trial) -> Schedule:
        """The schedule for an Optuna trial (asked or enqueued)."""
        n = trial.suggest_categorical("stages", self.config.stage_counts)
        drawn = [PatchShape.parse(trial.suggest_categorical(f"patch_{i}", self.free_patches))
                 for i in range(self._free_stages(n))]
        patches = sorted(drawn, key=lambda p: -p.area) + ([self.base_patch] if self.config.pin_last_to_base else [])
        indices = sorted(self._grid_index(trial.suggest_float(f"boundary_{i}", self.grid[0], self.grid[-1],
                                                              step=self.config.boundary_step))
                         for i in range(n - 1))
        for i in range(1, len(indices)):  # push apart: strictly increasing grid points
            indices[i] = max(indices[i], indices[i - 1] + 1)
        for i in reversed(range(len(indices))):  # and back inside the grid
            indices[i] = min(indices[i], len(self.grid) - (len(indices) - i))
        scales = self.config.guidance_scales
        guidance = [float(trial.suggest_categorical(f"cfg_{i}", scales)) if len(scales) > 1 else float(scales[0])
                    for i in range(n)]
        guidance = [None if g == self.default_guidance else g for g in guidance]
        return merged(Schedule.from_stages(patches, [self.grid[k] for k in indices], guidance))

    def _grid_index(self, t: float) -> int:
        return min(len(self.grid) - 1, max(0, round((t - self.grid[0]) / self.config.boundary_step)))

    def grid_search_space(self) -> dict[str, list]:
        """Every parameter :meth:`suggest` may ask for, with all its values (parameters a stage
        count does not use are ignored, so many points of their product give the same schedule)."""
        most = max(self.config.stage_counts)
        space = {"stages": list(self.config.stage_counts)}
        space.update({f"patch_{i}": list(self.free_patches) for i in range(self._free_stages(most))})
        space.update({f"boundary_{i}": list(self.grid) for i in range(most - 1)})
        if len(self.config.guidance_scales) > 1:
            space.update({f"cfg_{i}": list(self.config.guidance_scales) for i in range(most)})
        return space

    def schedules(self) -> list[Schedule]:
        """The distinct schedules of the space, cheapest-looking first (by text): what an
        exhaustive search evaluates."""
        import itertools

        from optuna.trial import FixedTrial

        space = self.grid_search_space()
        found = {str(s): s for values in itertools.product(*space.values())
                 for s in [self.suggest(FixedTrial(dict(zip(space, values))))]}
        return [found[text] for text in sorted(found)]

    def shapes_by_time(self) -> list[tuple[list[PatchShape], float]]:
        """The patch shapes some schedule of the space uses at each time, as (shapes, t_end)
        intervals covering [0, 1), coarsest shape first. With the last stage pinned to the base
        patch, a free shape can reach up to the last boundary (``boundary_max``) and the base patch
        starts at the first (``boundary_min``; everywhere when one stage is allowed)."""
        shapes = sorted(self.patches, key=lambda p: (-p.area, str(p)))
        if not self.config.pin_last_to_base or max(self.config.stage_counts) == 1:
            return [([self.base_patch] if self.config.pin_last_to_base else shapes, 1.0)]
        free = [p for p in shapes if str(p) in self.free_patches]
        single = 1 in self.config.stage_counts
        intervals = [(free + ([self.base_patch] if single else []), self.grid[0]),
                     (free + [self.base_patch], self.grid[-1]), ([self.base_patch], 1.0)]
        out = []
        for allowed, end in intervals:  # adjacent intervals with the same shapes joined
            if out and out[-1][0] == allowed:
                out[-1] = (allowed, end)
            elif not out or end > out[-1][1]:
                out.append((allowed, end))
        return out

    def params(self, schedule: Schedule) -> dict | None:
        """Parameters that :meth:`suggest` turns into ``schedule``; None when the schedule is
        outside the space (a patch, boundary or guidance scale it does not allow)."""
        n, stages = len(schedule.stages), schedule.stages
        if n not in self.config.stage_counts:
            return None
        if self.config.pin_last_to_base and stages[-1].patch != self.base_patch:
            return None
        params = {"stages": n}
        for i, stage in enumerate(stages[: self._free_stages(n)]):
            if str(stage.patch) not in self.free_patches:
                return None
            params[f"patch_{i}"] = str(stage.patch)
        for i, t in enumerate(schedule.boundaries):
            if t not in self.grid:
                return None
            params[f"boundary_{i}"] = t
        for i, stage in enumerate(stages):
            scale = self.default_guidance if stage.guidance is None else stage.guidance
            if scale not in self.config.guidance_scales:
                return None
            if len(self.config.guidance_scales) > 1:
                params[f"cfg_{i}"] = scale
        return params


def merged(schedule: Schedule) -> Schedule:
    """The same schedule with adjacent stages of equal patch and guidance joined."""
    stages = []
    for stage in schedule.stages:
        if stages and (stages[-1].patch, stages[-1].guidance) == (stage.patch, stage.guidance):
            stages[-1] = Stage(stage.patch, stages[-1].t_start, stage.t_end, stage.guidance)
        else:
            stages.append(stage)
    return Schedule(tuple(stages))


def baselines(base_patch: PatchShape) -> dict[str, Schedule]:
    """The original model and the paper's PPF-2 / PPF-3, adapted to the base patch (the paper's
    2x2 base gives 4x4@0.5,2x2 and 4x4@0.5,2x4@0.75,2x2)."""
    h, w = base_patch.h, base_patch.w
    return {
        "base": Schedule.from_stages([base_patch]),
        "PPF-2": Schedule.from_stages([PatchShape(2 * h, 2 * w), base_patch], [0.5]),
        "PPF-3": Schedule.from_stages([PatchShape(2 * h, 2 * w), PatchShape(h, 2 * w), base_patch], [0.5, 0.75]),
    }
