"""What users ask of a study: its trials and its front as DataFrames, one front trial picked (the
knee, or the best FID under a GMACs budget), a trial exported as a ``trainers/``-shaped YAML
that ``ppsearch train`` runs, and a plot of the front with the hypervolume's history."""
from __future__ import annotations

import json
import math
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from .config import StudyConfig, to_yaml, typed
from .errors import PPSearchError
from .fidelity import front as fidelity_front
from .schedule import Schedule
from .store import DatabaseUnreachable, LeaseInfo, Retry, Store, engine_options, hidden_password

# First the columns a user reads, then the rest of the table.
COLUMNS = ["trial", "schedule", "baseline", "gmacs", "speedup", "fid", "fid_std", "state", "checkpoint"]
# Trial user attributes the table shows as columns of their own (the driver writes them).
_ATTRS = ["rung", "promoted_from", "fidelity", "relative_gmacs", "fid_details", "timings", "compute", "final_loss", "losses", "attempts", "worker", "error",
          "log_tail", "reason", "repeat_of", "interrupted", "folder", "settings"]


class QueryError(PPSearchError):
    """A question the study cannot answer: unknown study or trial, a trial that is not
    COMPLETE, a bad pick."""


@dataclass
class StudyView:
    """A study opened for reading: Optuna's study and ppsearch's row (configuration, lease)."""

    name: str
    url: str
    study: optuna.Study
    store: Store
    study_id: int

    def trials(self) -> pd.DataFrame:
        """Every trial, one row each, by trial number: COLUMNS, then the trial's other records."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            attrs = t.user_attrs
            complete = t.state.name == "COMPLETE" and t.values is not None
            row = {"trial": t.number, "schedule": attrs.get("schedule"), "baseline": attrs.get("baseline"),
                   "gmacs": t.values[0] if complete else attrs.get("gmacs"),
                   "fid": t.values[1] if complete else None, "fid_std": attrs.get("fid_std"),
                   "state": t.state.name, "checkpoint": attrs.get("checkpoint"),
                   **{key: attrs.get(key) for key in _ATTRS},
                   "started": t.datetime_start, "finished": t.datetime_complete}
            rows.append(row)
        table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "speedup"] + _ATTRS + ["started", "finished"])
        table = table.astype({"gmacs": float, "fid": float, "fid_std": float, "relative_gmacs": float})
        return _view(table).sort_values("trial", ignore_index=True)

    def front(self) -> pd.DataFrame:
        """The non-dominated trials, by increasing GMACs: Optuna's ``best_trials`` (repeats are
        PRUNED, so never in it); with successive halving, among each schedule's highest rung."""
        numbers = {t.number for t in fidelity_front(self.study.get_trials(deepcopy=False))}
        table = self.trials()
        return _view(table[table.trial.isin(numbers)])

    def with_training_noise(self, table: pd.DataFrame) -> pd.DataFrame:
        noise = self.training_noise()
        return table.assign(training_std=noise["std"] if noise else float("nan"))

    def training_noise(self) -> dict | None:
        """The study's training noise: the FID spread between the base and its replicate (trained
        again with another seed, scored on the same noise and labels), as a standard deviation of
        one training's FID, the pairs' sampling noise taken out. None before a replicate is scored."""
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        pairs = []
        for t in trials.values():
            original = trials.get(t.user_attrs.get("replicate_of"))
            if "replicate_fid" in t.user_attrs and original is not None and original.state.name == "COMPLETE":
                replicate = SimpleNamespace(fid=t.user_attrs["replicate_fid"], fid_std=t.user_attrs.get("fid_std"),
                                            fid_details=t.user_attrs.get("fid_details"))
                first = SimpleNamespace(fid=original.values[1], fid_std=original.user_attrs.get("fid_std"),
                                        fid_details=original.user_attrs.get("fid_details"))
                pairs.append((original.number, t.number, *difference(replicate, first)))
        if not pairs:
            return None
        variance = np.mean([max(0.0, gap ** 2 - sampling ** 2) / 2 for _, _, gap, sampling in pairs])
        return {"std": float(math.sqrt(variance)), "pairs": len(pairs),
                "trials": [(a, b) for a, b, _, _ in pairs], "gaps": [gap for _, _, gap, _ in pairs]}

    def config(self) -> StudyConfig:
        stored = self.store.config(self.study_id)
        if stored is None:
            raise QueryError(f"study {self.name!r} holds no ppsearch configuration: was it made by ppsearch launch?")
        return typed(StudyConfig, stored, f"stored configuration of study {self.name}")

    def lease(self) -> LeaseInfo | None:
        return self.store.lease(self.study_id)


def trials(config_or_url: StudyConfig | str, study_name: str | None = None) -> pd.DataFrame:
    """Every trial of the study (every state: a repeat or a proposal over the GMACs budget is
    PRUNED with its ``reason``), by increasing GMACs; ``speedup`` is over the base schedule."""
    with open_study(config_or_url, study_name) as view:
        return _view(view.trials())


def training_noise(config_or_url: StudyConfig | str, study_name: str | None = None) -> dict | None:
    """The study's training noise (StudyView.training_noise)."""
    with open_study(config_or_url, study_name) as view:
        return view.training_noise()


def front(config_or_url: StudyConfig | str, study_name: str | None = None,
          max_gmacs: float | None = None, max_fid: float | None = None) -> pd.DataFrame:
    """The study's Pareto front (Optuna's ``best_trials``: minimum GMACs and FID), by increasing
    GMACs, optionally cut to ``gmacs <= max_gmacs`` and ``fid <= max_fid``."""
    with open_study(config_or_url, study_name) as view:
        table = view.with_training_noise(view.front())
    if max_gmacs is not None:
        table = table[table.gmacs <= max_gmacs]
    if max_fid is not None:
        table = table[table.fid <= max_fid]
    return table.reset_index(drop=True)


PICKS = "knee, best-fid-under-gmacs=X or cheapest-under-fid=Y"


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float, np.floating)) and value == value else 0.0


def difference(a, b, training_std: float = 0.0) -> tuple[float, float]:
    """FID of trial row ``a`` minus ``b`` and the noise of that difference. Both are scored on the
    same noise and labels (common random numbers), so where both keep their split FIDs the
    sampling noise of the difference is measured on the pairs (the splits hold the same samples):
    std(split_a - split_b) / sqrt(splits), smaller than either alone; else the two estimates add
    as if independent. Two trainings add 2 x the training variance."""
    splits = [d.get("split_fids") if isinstance(d, dict) else None
              for d in (getattr(a, "fid_details", None), getattr(b, "fid_details", None))]
    if splits[0] and splits[1] and len(splits[0]) == len(splits[1]) > 1:
        gaps = np.subtract(splits[0], splits[1])
        sampling = float(np.std(gaps, ddof=1) / math.sqrt(len(gaps)))
    else:
        sampling = math.hypot(_number(a.fid_std), _number(b.fid_std))
    return float(a.fid - b.fid), math.sqrt(sampling ** 2 + 2 * training_std ** 2)


def ties(a, b, training_std: float = 0.0) -> bool:
    """Whether two trials' FIDs are within each other's noise: a gap under twice the noise of
    their difference (see ``difference``)."""
    gap, noise = difference(a, b, training_std)
    return abs(gap) <= 2 * noise


def pick(front_table: pd.DataFrame, how: str) -> tuple[int, str]:
    """The trial number that ``how`` picks on a front (as ``front`` returns it), and one line
    saying why that point:

    - ``knee``: with GMACs and FID each scaled to [0, 1] over the front, the point farthest
      from the straight line joining the front's two ends, on the origin's side (the best
      trade-off of a convex front). A front of one or two points has no bend: the lower FID.
    - ``best-fid-under-gmacs=X``: the lowest FID among front points with ``gmacs <= X``.
    - ``cheapest-under-fid=Y``: the fewest GMACs among front points with ``fid <= Y``.

    Then every pick treats front points within each other's FID noise as ties and takes the
    cheapest of its ties that meets the pick's bound: a lower FID that noise cannot tell apart
    is not worth its compute.
    """
    if front_table.empty:
        raise QueryError("the front is empty: no trial is COMPLETE yet")
    table = front_table.sort_values(["gmacs", "fid", "trial"], ignore_index=True)
    for column in ("fid_std", "fid_details"):
        if column not in table:
            table = table.assign(**{column: None})
    match = re.fullmatch(r"(best-fid-under-gmacs|cheapest-under-fid)=(.+)", how)
    if how == "knee":
        scaled = [(v - v.min()) / ((v.max() - v.min()) or 1.0) for v in (table.gmacs, table.fid)]
        gain = 1.0 - scaled[0] - scaled[1]  # sqrt(2) x the distance to the line x + y = 1
        allowed = table
        chosen = table[np.isclose(gain, gain.max())].sort_values(["fid", "gmacs"]).iloc[0]
        why = "the knee: the best trade-off of GMACs and FID on the front"
    elif match:
        try:
            bound = float(match[2])
        except ValueError:
            raise QueryError(f"bad pick {how!r}: {match[2]!r} is not a number") from None
        if match[1] == "best-fid-under-gmacs":
            allowed = table[table.gmacs <= bound]
            if allowed.empty:
                raise QueryError(f"no front trial costs at most {bound:g} GMACs; the cheapest costs {table.gmacs.min():.4g}")
            chosen = allowed.sort_values(["fid", "gmacs"]).iloc[0]
            why = f"the lowest FID at no more than {bound:g} GMACs"
        else:
            allowed = table[table.fid <= bound]
            if allowed.empty:
                raise QueryError(f"no front trial has FID at most {bound:g}; the lowest is {table.fid.min():.4g}")
            chosen = allowed.sort_values(["gmacs", "fid"]).iloc[0]
            why = f"the fewest GMACs at FID no more than {bound:g}"
    else:
        raise QueryError(f"bad pick {how!r}: expected {PICKS}")
    training = _number(table.training_std.iloc[0]) if "training_std" in table else 0.0
    tied = np.array([ties(row, chosen, training) for row in allowed.itertuples()], dtype=bool)
    cheaper = allowed[(allowed.gmacs < chosen.gmacs).to_numpy() & tied]  # within the pick's own bound
    if not cheaper.empty:
        tie = cheaper.iloc[0]
        return int(tie.trial), (f"trial {int(tie.trial)}: FID {tie.fid:.3g} +- {tie.fid_std:.2g} ties with trial "
                                f"{int(chosen.trial)} ({why}: FID {chosen.fid:.3g} +- {chosen.fid_std:.2g}) within "
                                f"noise, at {tie.gmacs:.4g} instead of {chosen.gmacs:.4g} GMACs")
    return int(chosen.trial), f"trial {int(chosen.trial)}: {why} (FID {chosen.fid:.3g} at {chosen.gmacs:.4g} GMACs)"


def pick_trial(front_table: pd.DataFrame, how: str) -> int:
    """The trial number :func:`pick` chooses."""
    return pick(front_table, how)[0]


EXPORT_FORMATS = {"yaml": ".yaml", "json": ".json", "official": ".sh"}


def export_trial(config_or_url: StudyConfig | str, study_name: str | None = None, *, trial: int,
                 out: str | Path | None = None, format: str = "yaml") -> Path:
    """Write one COMPLETE trial's schedule (a number, or ``pick_trial(front(...), how)``) for
    training, by default to ``<export_dir>/<study>-trial<N>`` with the format's suffix; returns
    the path.

    - ``yaml``: the study's trainer with that schedule and the trainer's ``full_training`` recipe
      put over the trial's short fine-tune: a ``trainers/``-shaped file ``ppsearch train`` runs.
    - ``json``: the schedule (``Schedule.to_dict`` and its text) with the trial's GMACs and FID,
      for any other codebase.
    - ``official``: the command lines of the official PPFlow code, which expresses PPF-2 and
      PPF-3 only; any other schedule is refused in one line naming what that code lacks.
    """
    if format not in EXPORT_FORMATS:
        raise QueryError(f"unknown export format {format!r}: one of {', '.join(EXPORT_FORMATS)}")
    with open_study(config_or_url, study_name) as view:
        row = _complete_trial(view.trials(), trial, view.name)
        config, name = view.config(), view.name
    trainer, recipe = _full_training(config, row.schedule, f"runs/{name}-trial{trial}")
    fid_std = f" +- {row.fid_std:.2g}" if row.fid_std == row.fid_std else ""
    about = (f"Trial {trial} of study {name}: {row.schedule}, {row.gmacs:.4g} GMACs per sample "
             f"({row.speedup:.2f}x faster than the base), FID {row.fid:.3g}{fid_std}.")
    if format == "yaml":
        text = "# @package _global_\n" + _comment(f"{about} {recipe}") + to_yaml(trainer)
    elif format == "json":
        text = json.dumps({"study": name, "trial": trial, "schedule": row.schedule,
                           **Schedule.parse(row.schedule).to_dict(), "gmacs": row.gmacs,
                           "relative_gmacs": row.relative_gmacs, "fid": row.fid,
                           "fid_std": row.fid_std if row.fid_std == row.fid_std else None,
                           "fid_details": row.fid_details}, indent=2, default=str) + "\n"
    else:
        train_args, sample_args = official_arguments(trainer, Schedule.parse(row.schedule))
        text = _comment(f"{about} For the official PPFlow code (github.com/fudan-generative-vision/PPFlow), "
                        f"run in its folder: train.py also needs --data-path (an ImageNet image folder; it "
                        f"encodes the images itself), sample.py --ckpt (a checkpoint train.py wrote).")
        text += (f"torchrun --nnodes=1 --nproc_per_node={max(1, trainer.num_workers)} train.py "
                 f"{shlex.join(train_args)}\npython sample.py {shlex.join(sample_args)}\n")
    out = Path(out) if out is not None else Path(config.export_dir) / f"{name}-trial{trial}{EXPORT_FORMATS[format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _comment(text: str) -> str:
    import textwrap

    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 96, break_on_hyphens=False))


def _full_training(config: StudyConfig, schedule: str, out_dir: str) -> tuple:
    """The study's trainer for a full training of ``schedule`` into ``out_dir``: its
    ``full_training`` block put over the trial's settings, on the cluster the search used; and a
    sentence saying which recipe that is."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from .config import TrainerConfig

    trainer, recipe = config.trainer, dict(config.trainer.full_training or {})
    source = recipe.pop("about", None)
    full = typed(TrainerConfig, OmegaConf.merge(OmegaConf.create(asdict(trainer)), recipe, {"full_training": None}),
                 f"study {config.name}: trainer.full_training")
    full.schedule, full.out_dir, full.ray_address = schedule, out_dir, full.ray_address or config.ray.address
    if not recipe:
        return full, f"The trial's own recipe ({full.steps} steps): the study's trainer has no full_training block."
    where = f"on {full.num_workers} Ray Train workers" if full.num_workers else "in one process"
    trial = (f"{config.warm_start.trial_steps or trainer.steps}-step fine-tune from the study's warm start"
             if config.warm_start.steps else f"{trainer.steps}-step fine-tune")
    return full, (f"A full-training recipe from the base, not the trial's {trial}: {full.steps} steps of "
                  f"global batch {full.batch_size} {where}, lr {full.lr:g}, {full.warmup_steps} warm-up steps, "
                  f"EMA decay {full.ema_decay:g}" + (f" ({source})." if source else "."))


# The official code (fudan-generative-vision/PPFlow, models.py) knows two pyramids over a 2x2 base,
# its stage boundaries fixed at t = 0.5 and 0.75 (t = 0 noise, as here).
OFFICIAL_PYRAMIDS = {2: (["4x4", "2x2"], [0.5]), 3: (["4x4", "2x4", "2x2"], [0.5, 0.75])}
OFFICIAL_SIZES = ("S", "B", "L", "XL")


def official_arguments(trainer, schedule: Schedule) -> tuple[list[str], list[str]]:
    """The arguments of the official PPFlow code's train.py and ``sample.py ODE`` that train and
    sample ``schedule`` as ``trainer`` says; QueryError naming what that code lacks otherwise."""
    from .models import parse_model_name

    level, stages = len(schedule.stages), schedule.stages
    if level not in OFFICIAL_PYRAMIDS:
        raise QueryError(f"the official code has 2 or 3 stages (PPF-2 4x4@0.5,2x2, PPF-3 4x4@0.5,2x4@0.75,2x2); "
                         f"this schedule has {level}")
    shapes, boundaries = OFFICIAL_PYRAMIDS[level]
    for ordinal, stage, t_end in zip(("first", "second"), stages, boundaries):
        if stage.t_end != t_end:
            raise QueryError(f"the official code fixes its boundaries at 0.5 and 0.75; this schedule ends its "
                             f"{ordinal} stage at {stage.t_end:g}")
    if [str(s.patch) for s in stages] != shapes:
        raise QueryError(f"the official code's {level} stages have patches {', '.join(shapes)}; this schedule's "
                         f"have {', '.join(str(s.patch) for s in stages)}")
    named = trainer.model_name or (trainer.model if trainer.base is None else None)
    base = parse_model_name(named) if named else parse_model_name(str(trainer.base), anywhere=True)
    if base is None or base.size not in OFFICIAL_SIZES or base.patch != 2 or base.family == "DiT":
        shown = "the embedded tiny base (T/2)" if trainer.base == "embedded" else named or trainer.base
        raise QueryError(f"the official code builds PPFlow from SiT-S/2, B/2, L/2 or XL/2 only; this study's "
                         f"base is {shown}")
    side = trainer.data.resolution
    if trainer.data.name != "latents" or side not in (32, 64):
        raise QueryError(f"the official code trains on 256 or 512 px images (latents of side 32 or 64); this "
                         f"study's data is {trainer.data.name} of side {side}")
    model = f"PPFlow_{base.size}_{level}"
    scales = [f"{trainer.eval.guidance if s.guidance is None else s.guidance:g}" for s in stages]
    common = ["--model", model, "--image-size", str(8 * side), "--cfg-scales", *scales]
    train = [*common, "--patch-level", str(level), "--global-batch-size", str(trainer.batch_size),
             "--global-seed", str(trainer.seed), "--initialize_from", str(trainer.base)]
    sample = ["ODE", *common, "--num-sampling-steps", str(trainer.eval.steps),
              "--sampling-method", {"euler": "euler", "heun": "heun2"}[trainer.eval.solver]]
    return train, sample


def stored_config(url: str, study_name: str) -> StudyConfig:
    """The configuration the study was launched with."""
    with open_study(url, study_name) as view:
        return view.config()


EXTRACTOR_NAMES = {"ppsearch-digits": "digits-classifier features", "digits": "digits-classifier features",
                   "inception-v3-compat": "Inception-v3", "inception": "Inception-v3"}
FIGURE_FORMATS = (".png", ".svg", ".pdf")


def plot(config_or_url: StudyConfig | str, study_name: str | None = None, *, out: str | Path,
         pick_how: str = "knee") -> Path:
    """A figure (PNG, SVG or PDF by ``out``'s suffix). Left: every COMPLETE trial in (GMACs, FID)
    with its FID noise as error bars (sampling noise; training noise where the study measured it),
    the front as a step line with each point labelled by its schedule, the baselines and the
    picked trial (``pick_how``, the knee by default) in markers of their own, a speed-up axis
    over the base beside the GMACs axis, the FID axis naming its feature extractor (log scale
    where FIDs span more than a decade). Right: the front's hypervolume after each trial, the
    trials numbered as ``ppsearch status`` counts them (repeats and pruned proposals included)."""
    from matplotlib.figure import Figure  # Figure, not pyplot: the Agg canvas, no GUI, no global state
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    if out.suffix.lower() not in FIGURE_FORMATS:
        raise QueryError(f"plot --out {out}: the file must end in {', '.join(FIGURE_FORMATS)}")
    with open_study(config_or_url, study_name) as view:
        table = view.with_training_noise(view.trials())  # in trial order, for the history
        front_table, name = view.with_training_noise(view.front()), view.name
    done = table[table.state == "COMPLETE"]
    if done.empty:
        raise QueryError(f"study {name!r} has no COMPLETE trial to plot yet")
    extractors = {d.get("extractor") for d in done.fid_details if isinstance(d, dict)}
    fid_label = "FID (" + ", ".join(EXTRACTOR_NAMES.get(e, str(e)) for e in sorted(extractors, key=str)) + ")"
    noise = done.fid_std.fillna(0.0)
    if "training_std" in done:
        noise = np.hypot(noise, done.training_std.fillna(0.0))
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    ax, hv_ax = fig.subplots(1, 2, width_ratios=[1.6, 1])
    ax.errorbar(done.gmacs, done.fid, yerr=noise, fmt="o", ms=4, color="0.6", ecolor="0.75", capsize=2,
                label="trials (FID +- noise: sampling" + (", training" if "training_std" in done else "") + ")")
    front_sorted = front_table.sort_values("gmacs")
    ax.step(front_sorted.gmacs, front_sorted.fid, where="post", color="C3", zorder=3, label="front")
    front_noise = front_sorted.fid_std.fillna(0.0)
    if "training_std" in front_sorted:
        front_noise = np.hypot(front_noise, front_sorted.training_std.fillna(0.0))
    ax.errorbar(front_sorted.gmacs, front_sorted.fid, yerr=front_noise, fmt="o", color="C3", capsize=3, zorder=4)
    for row in front_sorted.itertuples():
        ax.annotate(row.schedule, (row.gmacs, row.fid), xytext=(5, -11), textcoords="offset points", fontsize=7,
                    color="C3")
    for marker, (baseline, rows) in zip("sD^v", done[done.baseline.notna()].groupby("baseline")):
        ax.scatter(rows.gmacs, rows.fid, marker=marker, s=70, facecolors="none", edgecolors="k", zorder=5,
                   label=f"{baseline} ({rows.schedule.iloc[0]})")
    picked, why = pick(front_table, pick_how)
    row = front_table.set_index("trial").loc[picked]
    ax.scatter([row.gmacs], [row.fid], marker="*", s=260, color="gold", edgecolors="k", zorder=6,
               label=f"picked ({pick_how}): {row.schedule}")
    if done.fid.max() > 10 * max(done.fid.min(), 1e-9):
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="GMACs per sample", ylabel=fid_label,
           title=f"{name}: {len(done)} complete trials, {len(front_table)} on the front")
    base_gmacs = float((done.gmacs * done.speedup).median())  # GMACs x speed-up = the base's GMACs
    top = ax.secondary_xaxis("top", functions=(lambda g: base_gmacs / np.maximum(g, 1e-12),
                                               lambda v: base_gmacs / np.maximum(v, 1e-12)))
    low, high = ax.get_xlim()
    top.set_xticks([v for v in (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12) if low <= base_gmacs / v <= high])
    top.set_xlabel("speed-up over the base (x)")
    ax.legend(fontsize=8, loc="upper right")
    counted = table[table.state.isin(["COMPLETE", "FAIL"])]  # the results n_trials counts, in trial order
    points = counted[["gmacs", "fid"]].to_numpy(float)
    complete = (counted.state == "COMPLETE").to_numpy()
    reference = 1.1 * points[complete].max(axis=0)
    history = [hypervolume(points[:k + 1][complete[:k + 1]], reference) for k in range(len(points))]
    hv_ax.plot(np.arange(1, len(points) + 1), history, drawstyle="steps-post", marker=".")
    hv_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    hv_ax.set(xlabel="results (as ppsearch status and n_trials count them)", ylabel="hypervolume of the front",
              title="search progress\n(reference point: 1.1 x the largest GMACs and FID)")
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):  # text stays text: editable
        fig.savefig(out, dpi=150)
    return out


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``:
    exact, in two dimensions a sum of rectangles along the front."""
    inside = points[(points < reference).all(axis=1)]
    area, lowest = 0.0, float(reference[1])
    for x, y in inside[np.lexsort((inside[:, 1], inside[:, 0]))]:
        if y < lowest:
            area += (reference[0] - x) * (lowest - y)
            lowest = y
    return area


def hypervolume_history(points: np.ndarray, reference: np.ndarray) -> list[float]:
    """Hypervolume (both objectives minimised) of ``points[:k + 1]``, for each k."""
    return [hypervolume(points[:k + 1], reference) for k in range(len(points))]


def _source(config_or_url: StudyConfig | str, study_name: str | None) -> tuple[str, str]:
    """(storage URL, study name) from a config, a study YAML file, or a URL and a name."""
    if isinstance(config_or_url, (str, Path)) and str(config_or_url).endswith((".yaml", ".yml")):
        from .config import load_study

        config_or_url = load_study(str(config_or_url))
    if isinstance(config_or_url, StudyConfig):
        return config_or_url.storage, study_name or config_or_url.name
    if not study_name:
        raise QueryError("name the study: a storage URL alone does not say which")
    return config_or_url, study_name


@contextmanager
def open_study(config_or_url: StudyConfig | str, study_name: str | None = None, retry_seconds: float = 0.0):
    """The study for reading, as a StudyView. A database that does not answer is one line
    ("database unreachable"), after ``retry_seconds`` of retries."""
    url, name = _source(config_or_url, study_name)
    retry = Retry(url, retry_seconds, lambda line: None)
    with retry(lambda: Store(url, must_exist=True), "opening the study database") as store:
        storage = retry(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url),
                                                           skip_table_creation=True), "opening Optuna's storage")
        try:
            present = retry(lambda: optuna.get_all_study_names(storage), "listing the studies")
            if name not in present:
                raise QueryError(f"no study {name!r} in {store.url}; studies present: {', '.join(present) or 'none'}")
            study = retry(lambda: optuna.load_study(study_name=name, storage=storage), "loading the study")
            yield StudyView(name, url, study, store, storage.get_study_id_from_name(name))
        except DatabaseUnreachable:
            raise
        except Exception as err:
            from .store import transient

            if transient(err):
                raise DatabaseUnreachable(f"database {hidden_password(url)} unreachable") from None
            raise
        finally:
            storage.engine.dispose()


def _view(table: pd.DataFrame) -> pd.DataFrame:
    view = table.drop(columns=["speedup"], errors="ignore").assign(speedup=1.0 / table.relative_gmacs)
    rest = [c for c in view.columns if c not in COLUMNS]
    return view[COLUMNS + rest].sort_values(["gmacs", "fid", "trial"], ignore_index=True)


def _complete_trial(table: pd.DataFrame, number: int, study_name: str):
    rows = table[table.trial == number]
    if rows.empty:
        raise QueryError(f"study {study_name!r} has no trial {number}; its trials are numbered "
                         f"{table.trial.min()} to {table.trial.max()}")
    row = rows.iloc[0]
    if row.state != "COMPLETE":
        raise QueryError(f"trial {number} of study {study_name!r} is {row.state}, not COMPLETE"
                         + (f": {row.error.splitlines()[0]}" if isinstance(row.error, str) and row.error else ""))
    return row

