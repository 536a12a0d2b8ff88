"""A stand-in trial body for benchmarks of the search driver (bench/orchestration.py): the
signature and result keys of ``ppsearch.trial.run_trial``, no model. It sleeps
``trainer.steps`` milliseconds (a "step" of 1 ms) and returns the schedule's analytic GMACs and
a noise-free synthetic FID, so the front is known in advance and not trivial.

It is its own small module so that Ray workers import it (with ``bench/`` on their PYTHONPATH)
without the benchmark's imports: select it with ``trial_function=standin:standin_trial``.
"""
from __future__ import annotations

import os
import socket
import time

from ppsearch.config import TrainerConfig
from ppsearch.data import load_dataset
from ppsearch.flops import relative_cost, sample_cost
from ppsearch.flow import SolverConfig
from ppsearch.models import PPFlowConfig
from ppsearch.schedule import Schedule
from ppsearch.train import base_model

STEP_SECONDS = 0.001  # a stand-in trial "trains" trainer.steps steps of this length
_model_configs: dict[str, PPFlowConfig] = {}


def model_config(trainer: TrainerConfig) -> PPFlowConfig:
    """The study's model sizes (as the driver works them out), once per worker process."""
    key = repr((trainer.base, trainer.model, trainer.model_name, trainer.data))
    if key not in _model_configs:
        data = load_dataset(trainer.data, "train")
        _model_configs[key] = base_model(trainer, data.shape, data.num_classes).config
    return _model_configs[key]


def synthetic_fid(schedule: Schedule, base_patch) -> float:
    """2, plus per stage its length x (patch area over the base's - 1) x (1 + 8 t^2) at the
    stage's middle time t, plus 0.2 per stage after the first: coarse patches cost quality
    mostly near the data, where the cheap ones are worth least."""
    fid = 2.0 + 0.2 * (len(schedule.stages) - 1)
    for stage in schedule.stages:
        middle = (stage.t_start + stage.t_end) / 2
        fid += stage.length * (stage.patch.area / base_patch.area - 1) * (1 + 8 * middle ** 2)
    return fid


def standin_trial(trainer: TrainerConfig, schedule: str, out_dir: str, shared=None) -> dict:
    """``run_trial``'s contract, with a sleep for the training and a formula for the FID."""
    started = time.perf_counter()
    time.sleep(trainer.steps * STEP_SECONDS)
    model = model_config(trainer)
    parsed = Schedule.parse(schedule)
    sampler = SolverConfig(steps=trainer.eval.steps, solver=trainer.eval.solver, guidance=trainer.eval.guidance)
    return {
        "gmacs": sample_cost(model, parsed, sampler).gmacs,
        "relative_gmacs": relative_cost(model, parsed, sampler),
        "fid": synthetic_fid(parsed, model.base_patch),
        "fid_std": 0.0,
        "fid_details": {"extractor": "synthetic (bench/standin.py)"},
        "timings": {"train": trainer.steps * STEP_SECONDS, "sampling": 0.0, "fid": 0.0,
                    "total": time.perf_counter() - started},
        "checkpoint": None,
        "final_loss": 0.0,
        "losses": [[trainer.steps, 0.0]],
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
