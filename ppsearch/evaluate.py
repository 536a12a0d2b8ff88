"""Scoring a variant under a schedule: sample with fixed noise and fixed class labels (the
same for every trial of a study: common random numbers), decode latents with the VAE where
the data are latents, and measure FID against cached reference statistics."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .config import EvalConfig
from .data import DataConfig, load_dataset
from .fid import FID, FIDResult
from .flops import sample_cost
from .flow import SamplerConfig, fixed_noise, sample
from .schedule import Schedule


@dataclass
class EvalResult:
    """One schedule's score: FID with its details, compute per sample, wall times."""

    schedule: str
    fid: FIDResult
    gmacs: float  # per generated sample, VAE decode not counted
    relative_gmacs: float  # over the base schedule (one stage at the base patch)
    sampler: dict
    sampling_seconds: float
    fid_seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "fid": self.fid.to_dict()}


def fixed_labels(num: int, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced class labels in a fixed shuffled order (so contiguous splits mix classes)."""
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=torch.Generator().manual_seed(seed))]


class Evaluator:
    """Scores variants of one dataset on the same noise and labels.

    Built once per worker: reference statistics come from the cache, the VAE (for latents)
    is loaded once; a bad FID setting fails here, before any sampling."""

    def __init__(self, config: EvalConfig, data: DataConfig, device: torch.device):
        self.config, self.device = config, torch.device(device)
        self.vae = None
        if data.name == "latents":
            from .latents import decode_latents, load_vae

            # Real images, drawn from the folder the latents were made from, are the reference.
            latents = load_dataset(data, "train")
            self.vae = load_vae(latents.meta["vae"], self.device)
            self._decode = lambda z: decode_latents(self.vae, z, latents.scale_factor, latents.shift_factor)
            images = latents.reference_images(config.num_samples, seed=config.seed)  # uint8, as FID takes them
            key, dataset = f"{data.name}-{latents.meta['files_sha256'][:12]}", latents
        else:
            images = dataset = load_dataset(data, "reference")
            key = f"{data.name}-reference-{data.resolution}"
        self.fid = FID(config.fid, images, key)
        self.shape, self.num_classes = dataset.shape, dataset.num_classes
        self.noise = fixed_noise(config.num_samples, self.shape, config.seed)
        self.labels = fixed_labels(config.num_samples, self.num_classes, config.seed)

    @property
    def sampler(self) -> SamplerConfig:
        c = self.config
        return SamplerConfig(steps=c.steps, solver=c.solver, guidance=c.guidance)

    def sample(self, model, schedule: Schedule, sampler: SamplerConfig | None = None) -> torch.Tensor:
        """All evaluation samples as images in [-1, 1], on the CPU."""
        sampler = sampler or self.sampler
        out = []
        for start in range(0, self.config.num_samples, self.config.batch_size):
            noise = self.noise[start:start + self.config.batch_size].to(self.device)
            labels = self.labels[start:start + self.config.batch_size].to(self.device)
            x = sample(model, schedule, noise, labels, sampler)
            out.append((self._decode(x) if self.vae is not None else x.clamp(-1, 1)).cpu())
        return torch.cat(out)

    def __call__(self, model, schedule: Schedule, sampler: SamplerConfig | None = None) -> EvalResult:
        return self.score(model, schedule, *self.timed_sample(model, schedule, sampler), sampler)

    def timed_sample(self, model, schedule: Schedule, sampler: SamplerConfig | None = None):
        start = time.perf_counter()
        images = self.sample(model, schedule, sampler)
        return images, time.perf_counter() - start

    def score(self, model, schedule: Schedule, images, sampling_seconds: float,
              sampler: SamplerConfig | None = None) -> EvalResult:
        sampler = sampler or self.sampler
        start = time.perf_counter()
        fid = self.fid.score(images, self.labels)
        cost = sample_cost(model.config, schedule, sampler)
        base = sample_cost(model.config, Schedule.from_stages([model.config.base_patch]), sampler)
        return EvalResult(str(schedule), fid, cost.gmacs, cost.macs / base.macs,
                          {"steps": sampler.steps, "solver": sampler.solver, "guidance": sampler.guidance,
                           "seed": self.config.seed},
                          sampling_seconds, time.perf_counter() - start)


def save_grid(images: torch.Tensor, path, nrow: int = 10) -> None:
    """A PNG grid of images in [-1, 1]."""
    from torchvision.utils import save_image

    save_image((images[: nrow * nrow] + 1) / 2, str(path), nrow=nrow)
