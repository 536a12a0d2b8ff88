"""The training loop, short enough to read in one sitting: data, model, optimiser, loop,
evaluation, checkpoint. Pretraining the tiny base, a trial's fine-tune and a full PPFlow
training from an exported config all run through :func:`train`; a full training on N workers
runs the same loop in each (``ppsearch.distributed``: Ray Train, DDP).

Every random draw of a step (which samples, their times, label drops and noise) comes from the
seed, the step and the sample's place in the global batch, never from the worker: N workers
with accumulation A make the same steps as one process, and a run resumes on another number of
workers."""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .errors import PPSearchError
from .checkpoint import CheckpointError, base_path, load_base, save_model
from .config import TrainerConfig
from .data import load_dataset
from .flow import NonFiniteLoss, sample_losses, stage_patches, update_ema
from .models import PPFlowDiT, build_named
from .schedule import Schedule
from .warm_start import Mixture, routing


class TrainError(PPSearchError):
    """A trainer config that cannot run, with the reason."""


class Stopped(KeyboardInterrupt):
    """A run stopped on request (``stop``, Ctrl-C, a cancelled Ray task), with a checkpoint at
    ``step`` (none when ``saved`` is False: no step had finished)."""

    def __init__(self, step: int, saved: bool):
        super().__init__(step, saved)
        self.step, self.saved = step, saved


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here; on CUDA, float32 matmuls and convolutions then use TF32
    (about 8x the float32 rate on an H100, with float32's range: training and sampling in
    float32 lose nothing a bf16 run would keep)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but this machine has no CUDA device")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def loader_workers(config: TrainerConfig) -> int:
    """Data-loader processes: ``config.loader_workers``, else the CPUs this run may use less one
    for the loop (``threads``, else Ray's reservation for the task, which Ray hands on as
    OMP_NUM_THREADS, else the CPUs this process may run on)."""
    if config.loader_workers is not None:
        return config.loader_workers
    cpus = config.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(0, cpus - 1)


@functools.lru_cache(maxsize=1)
def _loaded_base(path: str, mtime_ns: int, size: int, model_name: str | None) -> PPFlowDiT:
    return load_base(path, model_name)


def shared_base(path: Path, model_name: str | None) -> PPFlowDiT:
    """A fresh copy of the base at ``path``, read once per process (and again if the file changes)."""
    if not path.is_file():
        raise CheckpointError(f"base checkpoint not found: {path}")
    stat = path.stat()
    return copy.deepcopy(_loaded_base(str(path), stat.st_mtime_ns, stat.st_size, model_name))


def base_model(config: TrainerConfig, data_shape, num_classes: int) -> PPFlowDiT:
    """The base the config names (or a fresh model of its size), checked against the data."""
    channels, *size = data_shape
    if config.base is None:
        try:
            return build_named(config.model, input_size=tuple(size), in_channels=channels, num_classes=num_classes)
        except ValueError as err:
            raise TrainError(str(err)) from None
    model = shared_base(base_path(config.base), config.model_name)
    got = (model.config.in_channels, *model.config.input_size)
    if got != (channels, *size) or model.config.num_classes < num_classes:
        raise TrainError(f"base {config.base} takes {got[0]}x{got[1]}x{got[2]} latents of "
                         f"{model.config.num_classes} classes; the data is {channels}x{size[0]}x{size[1]} "
                         f"of {num_classes} classes")
    return model


def build_model(config: TrainerConfig, data_shape, num_classes: int, base: PPFlowDiT | None = None) -> PPFlowDiT:
    """The variant to train: the base (``base`` if already loaded) with a level for every patch
    shape of the schedule (or mixture), initialised from the base patch where the base has none;
    levels the schedule does not use (a warm start's) are dropped."""
    schedule = routing(config.schedule)
    model = base or base_model(config, data_shape, num_classes)
    schedule.check_for(model.config.input_size, model.config.base_patch)
    model.y_embedder.dropout_prob = config.class_dropout_prob
    return model.add_patch_shapes(schedule.patch_shapes).keep_patch_shapes(schedule.patch_shapes)


def micro_batch(config: TrainerConfig) -> int:
    """Samples a worker takes per micro-step: the global ``batch_size`` over workers x accumulation."""
    workers = max(1, config.num_workers)
    parts = workers * config.accumulation
    if config.batch_size % parts:
        raise TrainError(f"batch_size {config.batch_size} (the global batch) does not split over {workers} "
                         f"worker(s) x {config.accumulation} accumulation step(s); make it a multiple of {parts}")
    return config.batch_size // parts


def _generator(config: TrainerConfig, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((config.seed, step, stream)) % 2**63)


def step_indices(config: TrainerConfig, step: int, size: int) -> torch.Tensor:
    """The dataset index of each sample of the step's global batch (drawn with replacement)."""
    return torch.randint(size, (config.batch_size,), generator=_generator(config, step, 0))


def step_noise(config: TrainerConfig, step: int, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time, label drop (for guidance) and noise x0 of each sample of the step's global batch."""
    generator, n = _generator(config, step, 1), config.batch_size
    t = torch.rand(n, generator=generator)
    drop = torch.rand(n, generator=generator) < config.class_dropout_prob
    return t, drop, torch.randn((n, *shape), generator=generator)


def step_patches(route: Schedule | Mixture, config: TrainerConfig, step: int, t: torch.Tensor) -> list:
    """The patch shape of each sample of the step's global batch: its stage's, or one drawn
    among a mixture's (the draws depend on the step alone, as the noise does)."""
    if isinstance(route, Mixture):
        return route.patches(t, _generator(config, step, 2))
    return stage_patches(route, t)


def batches(dataset, config: TrainerConfig, start: int, rows: list[slice], device):
    """This worker's micro-batches (x1, y), step after step from ``start``: the ``rows`` of each
    step's global batch. Tensor datasets are indexed directly, others go through a loader."""
    plan = ((step, r) for step in itertools.count(start) for r in rows)
    if hasattr(dataset, "images"):
        for step, r in plan:
            index = step_indices(config, step, len(dataset))[r]
            yield dataset.images[index].to(device, non_blocking=True), dataset.labels[index].to(device)
    else:
        loader = torch.utils.data.DataLoader(
            dataset, num_workers=loader_workers(config), pin_memory=device.type == "cuda",
            batch_sampler=(step_indices(config, step, len(dataset))[r].tolist() for step, r in plan))
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class _DataParallel(DistributedDataParallel):
    """DDP that shows the model's ``config``, which ``flow.velocity`` reads."""

    @property
    def config(self):
        return self.module.config


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    final_loss: float
    seconds: float
    steps_per_second: float
    model: PPFlowDiT | None  # the EMA weights, as saved (None from a run on Ray Train workers)
    losses: list[list[float]]  # [step, mean loss since the previous entry], about 100 entries
    resumed_from: int = 0  # the step this run started at (config.steps: it was already finished)
    fid: dict | None = None  # the final EMA weights' evaluation (eval_at_end)


# What a checkpoint in out_dir must have been trained with to be resumed: everything that changes
# the weights a step makes, but not the step count (a longer run resumes a shorter one), nor how
# the global batch is split (workers, accumulation), logging, checkpointing or the evaluation.
_FINGERPRINT_FIELDS = ("schedule", "base", "model", "model_name", "data", "batch_size", "lr", "weight_decay",
                       "warmup_steps", "grad_clip", "ema_decay", "class_dropout_prob", "packed", "bf16", "seed")


def fingerprint(config: TrainerConfig) -> dict:
    data = asdict(config)
    return json.loads(json.dumps({k: data[k] for k in _FINGERPRINT_FIELDS}, default=str))


def _lr(config: TrainerConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr


def _check_out_dir(out: Path) -> None:
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TrainError(f"out_dir {out} cannot be made: {existing} is a file")


def train(config: TrainerConfig, log=print, base: PPFlowDiT | None = None,
          stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) the training ``config`` describes; the EMA weights are the result,
    written to ``out_dir/model.safetensors``. ``base``: the base, already loaded (this process
    only). ``num_workers`` N >= 1: on N Ray Train workers; 0: in this process.

    ``stop`` is asked between steps: once it says True, the run checkpoints and raises
    :class:`Stopped`. An interrupt (KeyboardInterrupt: Ctrl-C, a cancelled Ray task) does the same
    at the last finished step.
    """
    micro_batch(config)  # a global batch that does not split fails before anything starts
    _check_out_dir(Path(config.out_dir))
    if config.num_workers:
        from .distributed import train_on_workers

        return train_on_workers(config, log, stop)
    return run(config, log, base, stop)


def run(config: TrainerConfig, log=print, base: PPFlowDiT | None = None, stop: Callable[[], bool] | None = None,
        rank: int = 0, world: int = 1, device: torch.device | None = None) -> TrainResult:
    """The loop, in one process of ``world`` (rank 0 keeps the EMA, logs, checkpoints and
    evaluates; the result of other ranks carries no weights)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = device or resolve_device(config.device)
    out = Path(config.out_dir)
    data = load_dataset(config.data, "train")
    torch.manual_seed(config.seed)
    model = build_model(config, data.shape, data.num_classes, base).to(device)
    model.y_embedder.dropout_prob = 0.0  # labels are dropped by step_noise instead, per sample
    ema = copy.deepcopy(model).requires_grad_(False).eval() if rank == 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    state = Checkpoint(out, config, model, ema, optimizer)
    if config.init_from and rank == 0:
        _start_from(Path(config.init_from), out, log)
    if world > 1:
        dist.barrier()
    start, losses = state.resume(log if rank == 0 else lambda line: None)
    net = _DataParallel(model, find_unused_parameters=True) if world > 1 else model  # not every level in every batch
    schedule, micro = routing(config.schedule), micro_batch(config)
    local = config.batch_size // world
    rows = [slice(first, first + micro) for first in range(rank * local, (rank + 1) * local, micro)]
    stream = batches(data, config, start, rows, device)
    null_label = model.y_embedder.num_classes
    begun, bar, done, interval = time.perf_counter(), None, start, []
    every = max(1, config.steps // 100)
    if rank == 0 and config.progress and start < config.steps and sys.stderr.isatty():
        bar = tqdm(total=config.steps, initial=start, desc=f"train {schedule}", unit="step", dynamic_ncols=True)
    model.train()
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            t, drop, x0 = step_noise(config, step, data.shape)
            patches = step_patches(schedule, config, step, t)
            total = torch.zeros(2, device=device)  # this worker's share of the loss; rank 0: stop asked
            for i, r in enumerate(rows):
                x1, y = next(stream)
                y = torch.where(drop[r].to(device), null_label, y)
                with net.no_sync() if world > 1 and i < len(rows) - 1 else contextlib.nullcontext():
                    loss = sample_losses(net, x1, y, t[r].to(device), x0[r].to(device), patches[r], config.packed,
                                         config.bf16).sum() / local
                    loss.backward()
                total[0] += loss.detach()
            total[1] = float(rank == 0 and stop is not None and stop())
            if world > 1:
                dist.all_reduce(total)
            loss = total[0].item() / world
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"non-finite training loss {loss}")
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, model, min(config.ema_decay, step / (step + 10)))
            done = step + 1
            interval.append(loss)
            if done % every == 0 or done == config.steps:
                losses.append([done, sum(interval) / len(interval)])
                interval = []
            if rank == 0:
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                elif config.log_every and done % config.log_every == 0:
                    log(_progress(done, config.steps, loss, (done - start) / (time.perf_counter() - begun)))
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                    state.save(done, losses)
                if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                    evaluate(config, ema, done, device, log)
            if total[1]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0 and done > start:
            state.save(done, losses)  # at the last finished step: one cut short is done again
        raise Stopped(done, saved=done > start) from None
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - begun
    result = TrainResult(str(out / "model.safetensors"), config.steps, losses[-1][1] if losses else float("nan"),
                         seconds, (config.steps - start) / seconds if start < config.steps else 0.0,
                         ema, losses, start)
    if rank != 0:
        return result
    if start < config.steps:
        state.save(config.steps, losses)
    if config.eval_at_end:
        stored = evaluations(out).get(str(config.steps))
        same = stored is not None and stored["settings"] == _settings(config)
        result.fid = stored if same else evaluate(config, ema, config.steps, device, log)
    if not config.keep_train_state:
        (out / "train_state.pt").unlink(missing_ok=True)
    return result


def _progress(done: int, steps: int, loss: float, rate: float) -> str:
    eta = round((steps - done) / rate) if rate else 0
    return (f"step {done}/{steps} loss {loss:.4f} {rate:.2f} steps/s "
            f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def evaluations(out: Path) -> dict:
    """The evaluations of a run, by step: ``out/eval.json``."""
    try:
        return json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        return {}


def _settings(config: TrainerConfig) -> dict:
    return json.loads(json.dumps(asdict(config.eval), default=str))


def evaluate(config: TrainerConfig, ema: PPFlowDiT, step: int, device, log) -> dict:
    """FID of the EMA weights at ``step`` (the study's evaluation settings), logged and kept in
    ``out_dir/eval.json``."""
    from .evaluate import Evaluator

    result = Evaluator(config.eval, config.data, device)(ema.eval(), Schedule.parse(config.schedule))
    fid = {**result.fid.to_dict(), "gmacs": result.gmacs, "settings": _settings(config)}
    log(f"step {step}: FID {fid['fid']:.2f} +- {fid['fid_std'] or 0:.2f} ({fid['num_samples']} samples, "
        f"{fid['extractor']}, EMA weights)")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored = {**evaluations(out), str(step): fid}
    (out / "eval.json.tmp").write_text(json.dumps(stored, indent=2))
    (out / "eval.json.tmp").replace(out / "eval.json")
    return fid


class Checkpoint:
    """A run's files in ``out``: the EMA weights as safetensors (the deliverable, with the step,
    the loss history and the settings' fingerprint in its metadata) and the state to resume from
    (weights and optimiser: the random draws of a step depend on the step alone). Writes are
    atomic: a kill never leaves half a file. Rank 0 writes; every rank resumes."""

    def __init__(self, out: Path, config: TrainerConfig, model, ema, optimizer):
        self.out, self.config, self.model, self.ema, self.optimizer = out, config, model, ema, optimizer

    def save(self, step: int, losses: list) -> None:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(step), "losses": json.dumps(losses), "schedule": self.config.schedule,
                "fingerprint": json.dumps(fingerprint(self.config))}
        save_model(self.ema, out / "model.safetensors.tmp", meta)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}
        torch.save(state, out / "train_state.pt.tmp")
        (out / "model.safetensors.tmp").replace(out / "model.safetensors")
        (out / "train_state.pt.tmp").replace(out / "train_state.pt")
        (out / "trainer.json").write_text(json.dumps(asdict(self.config), indent=2, default=str))

    def resume(self, log) -> tuple[int, list]:
        """The step to start from and the loss history so far: (0, []), or where the files in
        ``out`` left off. Files of another training (other settings) are refused, not reused;
        a finished run without its optimiser state resumes as finished."""
        weights, state_path = self.out / "model.safetensors", self.out / "train_state.pt"
        if not weights.is_file():
            return 0, []
        metadata = _metadata(weights)
        stored = json.loads(metadata.get("fingerprint", "null"))
        if stored != fingerprint(self.config):
            changed = sorted(k for k in _FINGERPRINT_FIELDS if (stored or {}).get(k) != fingerprint(self.config)[k])
            raise TrainError(f"out_dir {self.out} holds a training with other settings ({', '.join(changed)}); "
                             f"give another out_dir, or delete that one to start over")
        step, losses = int(metadata["step"]), json.loads(metadata.get("losses", "[]"))
        if self.ema is not None:
            self.ema.load_state_dict(load_base(weights).state_dict())
        if not state_path.is_file():
            if step >= self.config.steps:
                return step, losses
            raise TrainError(f"out_dir {self.out} holds weights at step {step} without their optimiser state "
                             f"(train_state.pt); it cannot resume to {self.config.steps} steps")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as err:  # truncated, foreign or malicious: refused in one line
            raise TrainError(f"cannot resume from {state_path}: {type(err).__name__}: "
                             f"{(str(err).strip().splitlines() or [''])[0][:200]}; delete it to start over") from None
        if int(state["step"]) != step:
            raise TrainError(f"out_dir {self.out}: weights at step {step} but optimiser state at step "
                             f"{state['step']}; delete the folder to start over")
        if step < self.config.steps:
            log(f"resuming from step {step} in {self.out}")
        return step, losses


def _start_from(source: Path, out: Path, log) -> None:
    """Copy ``source``'s checkpoint (weights and optimiser state) into a fresh ``out``; the
    resume that follows checks it is this training's. Where this process does not see it (no
    shared filesystem), the run starts from the beginning and ends with the same weights."""
    files = [source / "model.safetensors", source / "train_state.pt"]
    if (out / "model.safetensors").exists() or source.resolve() == out.resolve():
        return
    if not all(f.is_file() for f in files):
        log(f"init_from {source}: no checkpoint there on this node; training from the start")
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in reversed(files):  # the weights last: their presence says the copy is whole
        shutil.copyfile(f, out / f"{f.name}.tmp")
        (out / f"{f.name}.tmp").replace(out / f.name)
    log(f"starting from {source}'s checkpoint")


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # torn or foreign file
        raise TrainError(f"cannot read {path}: {type(err).__name__}; delete it to start over") from None
