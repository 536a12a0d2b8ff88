"""Successive halving's rungs and the front they make.

A study with ``halving.rungs`` R > 1 runs every new schedule at rung 0 and promotes schedules
rung by rung up to R - 1, the trainer's own fidelity. Rung r fine-tunes ``eta^(R-1-r)`` times
fewer steps and scores ``eta^(R-1-r)`` times fewer FID samples (at least ``min_samples``); a
promoted trial starts from the lower rung's weights and optimiser state (the draws of a step
depend on the step alone, so it ends exactly where a trial run at that rung from the start would).

Promotion is asynchronous (ASHA's rule, made multi-objective): when a slot frees, the highest rung
with room promotes one of its results; a rung has room while fewer than one in ``eta`` of its
results were promoted; the candidates are the rung's non-dominated schedules not yet promoted,
the one adding the most hypervolume first.

The front is made of each schedule's highest rung: a result a promotion superseded is no longer a
front point. Without rungs it is Optuna's ``best_trials``."""
from __future__ import annotations

import math
from dataclasses import replace

from .config import HalvingConfig, TrainerConfig


def rung_trainer(trainer: TrainerConfig, halving: HalvingConfig, rung: int) -> TrainerConfig:
    """The trainer for a trial at ``rung`` (the top rung: ``trainer`` itself)."""
    factor = halving.eta ** (halving.rungs - 1 - rung)
    if factor == 1:
        return trainer
    samples = max(min(halving.min_samples, trainer.eval.num_samples), math.ceil(trainer.eval.num_samples / factor))
    return replace(trainer, steps=max(1, math.ceil(trainer.steps / factor)), keep_train_state=True,
                   eval=replace(trainer.eval, num_samples=samples, batch_size=min(trainer.eval.batch_size, samples)))


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: dict) -> list:
    """The keys of ``points`` (key -> objective values) that no other point dominates."""
    return [k for k, v in points.items() if not any(dominates(w, v) for w in points.values())]


def exclusive_hypervolume(points: dict) -> dict:
    """Each non-dominated 2-D point's own share of the hypervolume (the reference 10% beyond the
    worst value of each objective): what the front loses without it."""
    keys = sorted(non_dominated(points), key=lambda k: points[k])
    if not keys:
        return {}
    reference = [max(v[i] for v in points.values()) * 1.1 + 1e-12 for i in (0, 1)]
    share = {}
    for i, k in enumerate(keys):
        x, y = points[k]
        right = points[keys[i + 1]][0] if i + 1 < len(keys) else reference[0]
        above = points[keys[i - 1]][1] if i > 0 else reference[1]
        share[k] = (right - x) * (above - y)
    return share


def highest_rungs(trials: list) -> list:
    """The COMPLETE trials (FrozenTrial) that are their schedule's highest rung, replicates and
    repeats excluded (they are PRUNED)."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.values is not None]
    top: dict[str, int] = {}
    for t in complete:
        top[t.user_attrs.get("schedule")] = max(top.get(t.user_attrs.get("schedule"), -1), t.user_attrs.get("rung", 0))
    return [t for t in complete if t.user_attrs.get("rung", 0) == top[t.user_attrs.get("schedule")]]


def front(trials: list) -> list:
    """The study's front: the non-dominated trials among each schedule's highest rung."""
    candidates = {t.number: tuple(t.values) for t in highest_rungs(trials)}
    keep = set(non_dominated(candidates))
    return [t for t in trials if t.number in keep]


def promotion(results: list[dict], promoted: list[set], halving: HalvingConfig):
    """The next promotion, or None: ``results[r]`` maps a schedule to (trial number, gmacs, fid)
    at rung r (COMPLETE); ``promoted[r]`` holds the schedules rung r already sent up. Returns
    (schedule, trial number it comes from, the rung it goes to)."""
    for rung in reversed(range(halving.rungs - 1)):
        scored = results[rung]
        if len(scored) // halving.eta <= len(promoted[rung]):
            continue
        share = exclusive_hypervolume({s: (g, f) for s, (_, g, f) in scored.items()})
        candidates = sorted((s for s in share if s not in promoted[rung]), key=lambda s: -share[s])
        if candidates:
            return candidates[0], scored[candidates[0]][0], rung + 1
    return None
