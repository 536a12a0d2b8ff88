"""One trial, as a worker runs it: fine-tune the variant of the shared base for one schedule,
sample with the study's fixed noise and labels, score. Plain Python: Ray calls it remotely,
tests and debugging call it directly."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainerConfig
from .evaluate import Evaluator
from .schedule import Schedule
from .train import resolve_device, train


_evaluators: dict[str, Evaluator] = {}


def _evaluator(config: TrainerConfig, device: torch.device) -> Evaluator:
    """One evaluator per worker process: reference statistics and the VAE are loaded once."""
    key = repr((config.eval, config.data, device))
    if key not in _evaluators:
        _evaluators.clear()
        _evaluators[key] = Evaluator(config.eval, config.data, device)
    return _evaluators[key]


def run_trial(trainer: TrainerConfig, schedule: str, out_dir: str) -> dict:
    """Fine-tune ``trainer``'s base under ``schedule`` into ``out_dir`` (resuming there if an
    earlier attempt was cut short) and score it. Raises on any failure, NaN loss included."""
    started = time.perf_counter()
    config = replace(trainer, schedule=schedule, out_dir=out_dir, progress=False)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    evaluator = _evaluator(config, device)
    trained = train(config, log=lambda line: None)
    result = evaluator(trained.model, Schedule.parse(schedule))
    return {
        "gmacs": result.gmacs,
        "relative_gmacs": result.relative_gmacs,
        "fid": result.fid.fid,
        "fid_std": result.fid.fid_std,
        "fid_details": {**result.fid.to_dict(), "sampler": result.sampler},
        "timings": {"train": trained.seconds, "sampling": result.sampling_seconds, "fid": result.fid_seconds,
                    "total": time.perf_counter() - started},
        "checkpoint": str(Path(trained.checkpoint).resolve()),
        "final_loss": trained.final_loss,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
