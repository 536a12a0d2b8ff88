"""The training loop, short enough to read in one sitting: data, model, optimiser, loop,
checkpoint. Pretraining the tiny base, a trial's fine-tune and a full PPFlow training from an
exported config all run through :func:`train`."""
from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import PPSearchError
from .checkpoint import CheckpointError, base_path, load_base, save_model
from .config import TrainerConfig
from .data import load_dataset
from .flow import train_step, update_ema
from .models import PPFlowDiT, build_named
from .schedule import Schedule



class TrainError(PPSearchError):
    """A trainer config that cannot run, with the reason."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but this machine has no CUDA device")
    return torch.device(name)


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
    shape of the schedule, initialised from the base patch."""
    schedule = Schedule.parse(config.schedule)
    model = base or base_model(config, data_shape, num_classes)
    schedule.check_for(model.config.input_size, model.config.base_patch)
    model.y_embedder.dropout_prob = config.class_dropout_prob
    return model.add_patch_shapes(schedule.patch_shapes)


def batches(dataset, batch_size: int, generator: torch.Generator, device):
    """Endless random batches; tensor datasets are indexed directly, others go through a loader."""
    if hasattr(dataset, "images"):
        while True:
            index = torch.randint(len(dataset), (batch_size,), generator=generator)
            yield dataset.images[index].to(device, non_blocking=True), dataset.labels[index].to(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, drop_last=True, num_workers=2, pin_memory=device.type == "cuda",
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**12, generator=generator))
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    final_loss: float
    seconds: float
    steps_per_second: float
    model: PPFlowDiT  # the EMA weights, as saved
    losses: list[list[float]]  # [step, mean loss since the previous entry], about 100 entries
    resumed_from: int = 0  # the step this run started at (config.steps: it was already finished)


# What a checkpoint in out_dir must have been trained with to be resumed: everything that changes
# the weights a step makes, but not the step count (a longer run resumes a shorter one) nor
# logging, checkpointing, progress or the evaluation.
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


def train(config: TrainerConfig, log=print, base: PPFlowDiT | None = None) -> TrainResult:
    """Run (or resume) the training ``config`` describes; the EMA weights are the result,
    written to ``out_dir/model.safetensors``. ``base``: the base, already loaded.

    An interrupt (KeyboardInterrupt: Ctrl-C, SIGTERM through the command, a cancelled Ray task)
    writes a checkpoint at the current step before it propagates, so the run resumes there.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out_dir)
    _check_out_dir(out)
    data = load_dataset(config.data, "train")
    torch.manual_seed(config.seed)
    model = build_model(config, data.shape, data.num_classes, base).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device).manual_seed(config.seed + 1)
    state = Checkpoint(out, config, model, ema, optimizer, generator, noise_generator)
    start, losses = state.resume(log)
    schedule = Schedule.parse(config.schedule)
    stream = batches(data, config.batch_size, generator, device)
    loss, begun, bar, step = float("nan"), time.perf_counter(), None, start
    every, interval = max(1, config.steps // 100), []
    if config.progress and start < config.steps:
        bar = tqdm(total=config.steps, initial=start, desc=f"train {schedule}", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            x1, y = next(stream)
            loss = train_step(model, optimizer, x1, y, schedule, generator=noise_generator, packed=config.packed,
                              bf16=config.bf16, grad_clip=config.grad_clip)
            update_ema(ema, model, min(config.ema_decay, step / (step + 10)))
            interval.append(loss)
            if (step + 1) % every == 0 or step + 1 == config.steps:
                losses.append([step + 1, sum(interval) / len(interval)])
                interval = []
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            elif config.log_every and (step + 1) % config.log_every == 0:
                log(f"step {step + 1}/{config.steps} loss {loss:.4f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                state.save(step + 1, losses)
    except KeyboardInterrupt:
        if step > start:
            state.save(step, losses)  # the step in flight did not finish: resume before it
            log(f"interrupted: checkpoint at step {step} in {out}")
        raise
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - begun
    if start < config.steps:
        state.save(config.steps, losses)
    if not config.keep_train_state:
        (out / "train_state.pt").unlink(missing_ok=True)
    done = config.steps - start
    final = losses[-1][1] if losses else float("nan")
    return TrainResult(str(out / "model.safetensors"), config.steps, final, seconds,
                       done / seconds if done and seconds else 0.0, ema.eval(), losses, start)


class Checkpoint:
    """A run's files in ``out``: the EMA weights as safetensors (the deliverable, with the step,
    the loss history and the settings' fingerprint in its metadata) and the state to resume from
    (weights, optimiser, random generators). Writes are atomic: a kill never leaves half a file."""

    def __init__(self, out: Path, config: TrainerConfig, model, ema, optimizer, generator, noise_generator):
        self.out, self.config, self.model, self.ema, self.optimizer = out, config, model, ema, optimizer
        self.generator, self.noise_generator = generator, noise_generator

    def save(self, step: int, losses: list) -> None:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(step), "losses": json.dumps(losses), "schedule": self.config.schedule,
                "fingerprint": json.dumps(fingerprint(self.config))}
        save_model(self.ema, out / "model.safetensors.tmp", meta)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "generator": self.generator.get_state(), "noise_generator": self.noise_generator.get_state()}
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
            self.generator.set_state(state["generator"])
            self.noise_generator.set_state(state["noise_generator"])
        except Exception as err:  # truncated, foreign or malicious: refused in one line
            raise TrainError(f"cannot resume from {state_path}: {type(err).__name__}: "
                             f"{(str(err).strip().splitlines() or [''])[0][:200]}; delete it to start over") from None
        if int(state["step"]) != step:
            raise TrainError(f"out_dir {self.out}: weights at step {step} but optimiser state at step "
                             f"{state['step']}; delete the folder to start over")
        log(f"resuming from step {step} in {self.out}")
        return step, losses


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # torn or foreign file
        raise TrainError(f"cannot read {path}: {type(err).__name__}; delete it to start over") from None
