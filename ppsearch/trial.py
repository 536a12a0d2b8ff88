"""One trial, as a worker runs it: fine-tune the variant of the shared base for one schedule,
sample with the study's fixed noise and labels, score. Plain Python: Ray calls it remotely,
tests and debugging call it directly.

The trial's folder (keyed by the study and the schedule, never reused across studies) holds the
EMA weights, a grid of samples, the training log and, once scored, ``result.json``: a trial
started again after its driver died picks up where it stopped (its checkpoint, or its result)."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import TrainerConfig
from .evaluate import Evaluator, save_grid
from .flops import train_step_macs
from .runners import Shared
from .schedule import Schedule
from .train import Stopped, fingerprint, resolve_device, train

LOG_TAIL = 20  # lines of a failed trial's log that go with its error

_evaluators: dict[str, Evaluator] = {}


class TrialFailed(Exception):
    """A trial's own error, with the last lines of its log."""

    def __init__(self, message: str, log_tail: list[str]):
        super().__init__(message)
        self.log_tail = log_tail

    def __reduce__(self):  # travels back from a Ray worker intact
        return type(self), (str(self), self.log_tail)


def _evaluator(config: TrainerConfig, device: torch.device, reference) -> Evaluator:
    """One evaluator per worker process: reference statistics and the VAE are loaded once."""
    key = repr((config.eval, config.data, device))
    if key not in _evaluators:
        _evaluators.clear()
        _evaluators[key] = Evaluator(config.eval, config.data, device, reference=reference)
    return _evaluators[key]


class _Log:
    """The trial's log: lines appended to ``trial.log`` in its folder, the last ones kept."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        self.lines = (self.lines + [stamped])[-LOG_TAIL:]
        try:
            with open(self.path, "a") as f:
                f.write(stamped + "\n")
        except OSError:
            pass  # the log is a convenience; the result does not depend on it


def run_trial(trainer: TrainerConfig, schedule: str, out_dir: str, shared: Shared | None = None) -> dict:
    """Fine-tune ``trainer``'s base under ``schedule`` into ``out_dir`` (resuming there if an
    earlier attempt was cut short) and score it. Raises TrialFailed on any failure (NaN loss
    included), with the log's last lines."""
    started = time.perf_counter()
    config = replace(trainer, schedule=schedule, out_dir=out_dir, progress=False)
    out = Path(out_dir)
    done = _stored_result(out, config)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "trial.log")
    log(f"trial {schedule} on {socket.gethostname()}:{os.getpid()}")
    try:
        return _run(config, out, shared or Shared(), log, started)
    except Stopped as stopped:  # cancelled (Ray's KeyboardInterrupt): the next attempt resumes there
        log(f"interrupted: checkpoint at step {stopped.step}" if stopped.saved else "interrupted before a step ended")
        raise
    except KeyboardInterrupt:
        raise
    except Exception as err:
        message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1]}"
        log(f"failed: {message}")
        raise TrialFailed(message[:500], log.lines) from None


def _run(config: TrainerConfig, out: Path, shared: Shared, log, started: float) -> dict:
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    evaluator = _evaluator(config, device, shared.get("reference"))
    base = shared.get("base")
    trained = train(config, log=log, base=None if base is None else _copy(base))
    log(f"trained to step {trained.steps} (loss {trained.final_loss:.4f}); sampling")
    schedule = Schedule.parse(config.schedule)
    result = evaluator(trained.model, schedule)
    save_grid(result.images, out / "samples.png", title=f"{schedule} (trial samples, {out.name})")
    log(f"FID {result.fid.fid:.2f} +- {result.fid.fid_std or 0:.2f}")
    record = {
        "gmacs": result.gmacs,
        "relative_gmacs": result.relative_gmacs,
        "fid": result.fid.fid,
        "fid_std": result.fid.fid_std,
        "fid_details": {**result.fid.to_dict(), "sampler": result.sampler},
        "timings": {"train": trained.seconds, "sampling": result.sampling_seconds, "fid": result.fid_seconds,
                    "total": time.perf_counter() - started},
        "compute": {"train_gmacs": train_step_macs(trained.model.config, schedule, config.batch_size)
                    * (trained.steps - trained.resumed_from) / 1e9,
                    "sampling_gmacs": result.gmacs * config.eval.num_samples},
        "checkpoint": str(out.resolve()),
        "final_loss": trained.final_loss,
        "losses": trained.losses,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    _write_result(out, config, record)
    return record


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _stored_result(out: Path, config: TrainerConfig) -> dict | None:
    """The result an earlier attempt of this very trial finished with, if any."""
    path = out / "result.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (stored.get("fingerprint"), stored.get("steps"), stored.get("eval")) != (
            fingerprint(config), config.steps, _eval_settings(config)):
        return None
    return stored["result"]


def _eval_settings(config: TrainerConfig) -> dict:
    return json.loads(json.dumps(asdict(config.eval), default=str))


def _write_result(out: Path, config: TrainerConfig, record: dict) -> None:
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint(config), "steps": config.steps,
                               "eval": _eval_settings(config),
                               "result": record}))
    tmp.replace(out / "result.json")
