"""What users ask of a study: its trials and its front as DataFrames, one front trial picked (the
knee, or the best FID under a GMACs budget), a trial exported as a ``trainers/``-shaped YAML
that ``ppsearch train`` runs, and a plot of the front with the hypervolume's history."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from .errors import PPSearchError
from .config import StudyConfig, to_yaml, typed
from .errors import PPSearchError
from .store import DatabaseUnreachable, LeaseInfo, Retry, Store, engine_options, hidden_password

# First the columns a user reads, then the rest of the table.
COLUMNS = ["trial", "schedule", "baseline", "gmacs", "speedup", "fid", "fid_std", "state", "checkpoint"]
# Trial user attributes the table shows as columns of their own (the driver writes them).
_ATTRS = ["relative_gmacs", "fid_details", "timings", "final_loss", "losses", "attempts", "worker", "error",
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
        """Optuna's ``best_trials``, by increasing GMACs (repeats are PRUNED, so never in it)."""
        numbers = {t.number for t in self.study.best_trials}
        table = self.trials()
        return _view(table[table.trial.isin(numbers)])

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


def front(config_or_url: StudyConfig | str, study_name: str | None = None,
          max_gmacs: float | None = None, max_fid: float | None = None) -> pd.DataFrame:
    """The study's Pareto front (Optuna's ``best_trials``: minimum GMACs and FID), by increasing
    GMACs, optionally cut to ``gmacs <= max_gmacs`` and ``fid <= max_fid``."""
    with open_study(config_or_url, study_name) as view:
        table = view.front()
    if max_gmacs is not None:
        table = table[table.gmacs <= max_gmacs]
    if max_fid is not None:
        table = table[table.fid <= max_fid]
    return table.reset_index(drop=True)


PICKS = "knee, best-fid-under-gmacs=X or cheapest-under-fid=Y"


def ties(fid_a: float, std_a: float, fid_b: float, std_b: float) -> bool:
    """Whether two FIDs are within each other's noise: a gap under twice the root sum of squares
    of their noise estimates (no estimate: no noise)."""
    noise = math.hypot(std_a if std_a == std_a else 0.0, std_b if std_b == std_b else 0.0)
    return abs(fid_a - fid_b) <= 2 * noise


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
    if "fid_std" not in table:
        table = table.assign(fid_std=float("nan"))
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
    tied = np.array([ties(f, s, chosen.fid, chosen.fid_std) for f, s in zip(allowed.fid, allowed.fid_std)], dtype=bool)
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


def export_trial(config_or_url: StudyConfig | str, study_name: str | None = None, *, trial: int,
                 out: str | Path | None = None) -> Path:
    """Write the study's trainer config with the schedule of one COMPLETE trial (a number, or
    ``pick_trial(front(...), how)``) as a ``trainers/``-shaped YAML that ``ppsearch train``
    runs; by default to ``<export_dir>/<study>-trial<N>.yaml``. Returns the path."""
    with open_study(config_or_url, study_name) as view:
        row = _complete_trial(view.trials(), trial, view.name)
        config, name = view.config(), view.name
    trainer = config.trainer
    trainer.schedule = row.schedule  # its per-stage guidance is part of the text
    trainer.out_dir = f"runs/{name}-trial{trial}"
    out = Path(out) if out is not None else Path(config.export_dir) / f"{name}-trial{trial}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# @package _global_\n# Trial {trial} of study {name}: {row.gmacs:.4g} GMACs per sample "
                   f"({row.speedup:.2f}x faster than the base), FID {row.fid:.3g} +- {row.fid_std:.2g}.\n"
                   + to_yaml(trainer))
    return out


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
        table = view.trials()  # in trial order, for the history
        front_table, name = view.front(), view.name
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
                label="trials (FID +- noise)")
    front_sorted = front_table.sort_values("gmacs")
    ax.step(front_sorted.gmacs, front_sorted.fid, where="post", color="C3", zorder=3, label="front")
    ax.errorbar(front_sorted.gmacs, front_sorted.fid, yerr=front_sorted.fid_std.fillna(0.0), fmt="o", color="C3",
                capsize=3, zorder=4)
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
        ax.set_yscale("log")
    ax.set(xlabel="GMACs per sample", ylabel=fid_label,
           title=f"{name}: {len(done)} complete trials, {len(front_table)} on the front")
    base_gmacs = float((done.gmacs / done.speedup).median())  # GMACs x speed-up = the base's GMACs
    top = ax.secondary_xaxis("top", functions=(lambda g: base_gmacs / np.maximum(g, 1e-12),
                                               lambda v: base_gmacs / np.maximum(v, 1e-12)))
    top.set_xlabel("speed-up over the base (x)")
    ax.legend(fontsize=8, loc="upper right")
    points = table[["gmacs", "fid"]].to_numpy(float)  # every trial, in the order status counts them
    complete = (table.state == "COMPLETE").to_numpy()
    reference = 1.1 * points[complete].max(axis=0)
    history = [hypervolume(points[:k + 1][complete[:k + 1]], reference) for k in range(len(points))]
    hv_ax.plot(table.trial, history, drawstyle="steps-post", marker=".")
    hv_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    hv_ax.set(xlabel="trial (as ppsearch status counts them)", ylabel="hypervolume",
              title="front hypervolume (reference: 1.1 x max GMACs, 1.1 x max FID)")
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

