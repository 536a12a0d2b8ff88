"""A full training on many workers: Ray Train runs :func:`ppsearch.train.run` in one process per
GPU (``TorchTrainer``, DDP), on the Ray cluster the search used. Rank 0 talks to the command
through a small actor, :class:`Channel`: its log lines come out, a stop request goes in, its
result comes out (Ray Train keeps metrics only beside its own checkpoints; ppsearch keeps its
own, in ``out_dir``)."""
from __future__ import annotations

import copy
import os
import signal
import threading
from pathlib import Path
from typing import Callable

from .config import StudyConfig, TrainerConfig
from .errors import PPSearchError
from .runners import _quiet_token_notice
from .search import paths_made_absolute
from .train import Stopped, TrainError, TrainResult, run


class Channel:
    """Between the command and rank 0: log lines, a stop request, the result."""

    def __init__(self):
        self.lines, self.stop, self.result = [], False, None

    def log(self, line: str) -> None:
        self.lines.append(line)

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def finish(self, result: dict) -> None:
        self.result = result

    def get_result(self) -> dict | None:
        return self.result


def _worker(args: dict) -> None:
    """One Ray Train worker: the loop at its rank; rank 0 hands its result to the channel."""
    import ray
    import ray.train
    import ray.train.torch

    config, channel = args["config"], args["channel"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    log = (lambda line: channel.log.remote(line)) if rank == 0 else (lambda line: None)
    try:
        result = run(config, log, stop=lambda: ray.get(channel.stop_requested.remote()), rank=rank,
                     world=context.get_world_size(), device=ray.train.torch.get_device())
        summary = {k: v for k, v in vars(result).items() if k != "model"}
    except Stopped as stopped:
        summary = {"stopped": stopped.step, "saved": stopped.saved}
    if rank == 0:
        ray.get(channel.finish.remote(summary))


def train_on_workers(config: TrainerConfig, log=print, stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train ``config`` on ``num_workers`` Ray Train workers; as :func:`ppsearch.train.train`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if config.device.startswith("cuda") != config.use_gpu and config.device != "auto":
        raise TrainError(f"device {config.device} with num_workers {config.num_workers}: set use_gpu="
                         f"{str(config.device.startswith('cuda')).lower()} (each worker gets the device Ray gives it)")
    # Every worker reads the files the command means, whatever its working folder.
    config = paths_made_absolute(StudyConfig(trainer=copy.deepcopy(config))).trainer
    config.out_dir = str(Path(config.out_dir).resolve())
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    _quiet_token_notice()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, configure_logging=False,
                 **({} if address else {"include_dashboard": False}))
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise TrainError(f"cannot reach Ray at {address}: {str(err).splitlines()[0]}") from None
    if threading.current_thread() is threading.main_thread():
        for number, handler in handlers.items():  # ray.init sets its own for SIGTERM: the command's stay
            signal.signal(number, handler)
    channel = ray.remote(num_cpus=0)(Channel).remote()
    trainer = TorchTrainer(
        _worker, train_loop_config={"config": config, "channel": channel},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name="ray-train", storage_path=config.out_dir))
    failure = []
    # fit() waits in a thread of its own, so that the command's signal handlers stay in place
    # (Ray Train's own, in the main thread, would abort the workers without a checkpoint).
    fit = threading.Thread(target=lambda: _catch(trainer.fit, failure), daemon=True)
    fit.start()
    asked = False
    try:
        while fit.is_alive():
            fit.join(0.5)
            for line in ray.get(channel.take_lines.remote()):
                log(line)
            if stop is not None and not asked and stop():
                ray.get(channel.request_stop.remote())
                asked = True
        summary = ray.get(channel.get_result.remote())
    finally:
        if not address:
            ray.shutdown()
    if failure:
        raise _user_error(failure[0])
    if "stopped" in summary:
        raise Stopped(summary["stopped"], summary["saved"])
    return TrainResult(model=None, **summary)


def _catch(function, errors: list) -> None:
    try:
        function()
    except Exception as err:
        errors.append(err)


def _user_error(err: Exception) -> Exception:
    """A worker's own mistake (a PPSearchError: a foreign out_dir, a bad base) as itself, so the
    command shows it in one line; anything else as Ray raised it."""
    for failure in getattr(err, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, PPSearchError):
            return cause
    return err
