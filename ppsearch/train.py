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

from .checkpoint import CheckpointError, base_path, load_base, save_model
from .config import TrainerConfig
from .data import load_dataset
from .flow import train_step, update_ema
from .models import PPFlowDiT, build_named
from .schedule import Schedule



class TrainError(ValueError):
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


def _lr(config: TrainerConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr


def train(config: TrainerConfig, log=print) -> TrainResult:
    """Run (or resume) the training ``config`` describes; the EMA weights are the result,
    written to ``out_dir/model.safetensors``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out_dir)
    data = load_dataset(config.data, "train")
    torch.manual_seed(config.seed)
    model = build_model(config, data.shape, data.num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device).manual_seed(config.seed + 1)
    start = _resume(out, model, ema, optimizer, generator, noise_generator, log)
    schedule = Schedule.parse(config.schedule)
    stream = batches(data, config.batch_size, generator, device)
    loss, begun, bar = float("nan"), time.perf_counter(), None
    if config.progress and start < config.steps:
        bar = tqdm(total=config.steps, initial=start, desc=f"train {schedule}", unit="step", dynamic_ncols=True)
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step)
        x1, y = next(stream)
        loss = train_step(model, optimizer, x1, y, schedule, generator=noise_generator, packed=config.packed,
                          bf16=config.bf16, grad_clip=config.grad_clip)
        update_ema(ema, model, min(config.ema_decay, step / (step + 10)))
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif config.log_every and (step + 1) % config.log_every == 0:
            log(f"step {step + 1}/{config.steps} loss {loss:.4f}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save(out, config, model, ema, optimizer, generator, noise_generator, step + 1, loss)
    if bar:
        bar.close()
    seconds = time.perf_counter() - begun
    _save(out, config, model, ema, optimizer, generator, noise_generator, config.steps, loss)
    done = config.steps - start
    return TrainResult(str(out / "model.safetensors"), config.steps, loss, seconds,
                       done / seconds if seconds else 0.0, ema.eval())


def _save(out: Path, config, model, ema, optimizer, generator, noise_generator, step, loss):
    """The EMA weights as safetensors (the deliverable), and the state to resume from."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "loss": repr(loss), "schedule": config.schedule}
    save_model(ema, out / "model.safetensors.tmp", meta)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "generator": generator.get_state(), "noise_generator": noise_generator.get_state()}
    torch.save(state, out / "train_state.pt.tmp")
    (out / "model.safetensors.tmp").replace(out / "model.safetensors")  # atomic: a kill never leaves half a file
    (out / "train_state.pt.tmp").replace(out / "train_state.pt")
    (out / "trainer.json").write_text(json.dumps(asdict(config), indent=2, default=str))


def _resume(out: Path, model, ema, optimizer, generator, noise_generator, log) -> int:
    """The step to start from: 0, or where the last checkpoint in ``out`` left off."""
    state_path = out / "train_state.pt"
    if not state_path.is_file():
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    noise_generator.set_state(state["noise_generator"])
    ema.load_state_dict(load_base(out / "model.safetensors").state_dict())
    log(f"resuming from step {state['step']} in {out}")
    return int(state["step"])
