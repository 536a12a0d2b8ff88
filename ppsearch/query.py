"""What users ask of a study: its trials and its front as DataFrames, one front trial picked (the
knee, or the best FID under a GMACs budget), a trial exported as a ``trainers/``-shaped YAML
that ``ppsearch train`` runs, and a plot of the front with the hypervolume's history."""
from __future__ import annotations

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


def pick_trial(front_table: pd.DataFrame, how: str) -> int:
    """The trial number that ``how`` picks on a front (as ``front`` returns it):

    - ``knee``: with GMACs and FID each scaled to [0, 1] over the front, the point farthest
      from the straight line joining the front's two ends, on the origin's side (the best
      trade-off of a convex front); ties go to the lower FID. A front of one or two points
      has no bend: the lower FID wins.
    - ``best-fid-under-gmacs=X``: the lowest FID among front points with ``gmacs <= X``.
    """
    if front_table.empty:
        raise QueryError("the front is empty: no trial is COMPLETE yet")
    match = re.fullmatch(r"best-fid-under-gmacs=(.+)", how)
    if how == "knee":
        scaled = [(v - v.min()) / ((v.max() - v.min()) or 1.0) for v in (front_table.gmacs, front_table.fid)]
        gain = 1.0 - scaled[0] - scaled[1]  # sqrt(2) x the distance to the line x + y = 1
        best = front_table[np.isclose(gain, gain.max())]
    elif match:
        try:
            budget = float(match[1])
        except ValueError:
            raise QueryError(f"bad pick {how!r}: {match[1]!r} is not a number") from None
        best = front_table[front_table.gmacs <= budget]
        if best.empty:
            raise QueryError(f"no front trial costs at most {budget:g} GMACs; "
                             f"the cheapest costs {front_table.gmacs.min():.4g}")
    else:
        raise QueryError(f"bad pick {how!r}: expected knee or best-fid-under-gmacs=X")
    return int(best.sort_values(["fid", "gmacs", "trial"]).trial.iloc[0])


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


def plot(config_or_url: StudyConfig | str, study_name: str | None = None, *, out: str | Path) -> Path:
    """A PNG: left, every COMPLETE trial in (GMACs, FID) with its FID noise as error bar, the
    front joined as a step line, baselines named; right, the front's hypervolume after each
    trial, against 1.1 x the largest GMACs and FID of the completed trials."""
    from matplotlib.figure import Figure  # Figure, not pyplot: the Agg canvas, no GUI, no global state
    from matplotlib.ticker import MaxNLocator

    with open_study(config_or_url, study_name) as view:
        done = view.trials().query("state == 'COMPLETE'")  # in trial order, for the history
        front_table, name = view.front(), view.name
    if done.empty:
        raise QueryError(f"study {name!r} has no COMPLETE trial to plot yet")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, hv_ax = fig.subplots(1, 2)
    ax.errorbar(done.gmacs, done.fid, yerr=done.fid_std.fillna(0), fmt="o", ms=4, color="0.55", ecolor="0.8",
                label="trials")
    ax.step(front_table.gmacs, front_table.fid, where="post", color="C3", marker="o", zorder=3, label="front")
    for row in done[done.baseline.notna()].itertuples():
        ax.annotate(row.baseline, (row.gmacs, row.fid), xytext=(6, 6), textcoords="offset points")
    ax.set(xlabel="GMACs per sample", ylabel="FID",
           title=f"{name}: {len(done)} complete trials, {len(front_table)} on the front")
    ax.legend()
    points = done[["gmacs", "fid"]].to_numpy(float)
    reference = 1.1 * points.max(axis=0)
    hv_ax.plot(done.trial, hypervolume_history(points, reference), drawstyle="steps-post", marker=".")
    hv_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    hv_ax.set(xlabel="trial", ylabel="hypervolume",
              title="front hypervolume (reference: 1.1 x max GMACs, 1.1 x max FID)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
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

