"""Scoring a variant under a schedule: sample with fixed noise and fixed class labels (the
same for every trial of a study: common random numbers), decode latents with the VAE where
the data are latents, and measure FID against cached reference statistics."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .config import EvalConfig
from .data import DataConfig, load_dataset
from .fid import FID, FIDResult, ReferenceStats
from .flops import sample_cost
from .flow import SolverConfig, fixed_noise, sample
from .schedule import Schedule


@dataclass
class EvalResult:
    """One schedule's score: FID with its details, compute per sample, wall times."""

    schedule: str
    fid: FIDResult
    gmacs: float  # per generated sample, VAE decode not counted
    relative_gmacs: float  # over the base schedule (one stage at the base patch)
    sampler: dict  # the solver settings the samples were made with
    sampling_seconds: float
    fid_seconds: float
    images: torch.Tensor | None = field(default=None, repr=False)  # the first GRID_SAMPLES, for a grid

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "images"}, "fid": self.fid.to_dict()}


def fixed_labels(num: int, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced class labels in a fixed shuffled order (so contiguous splits mix classes)."""
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=torch.Generator().manual_seed(seed))]


def _reference(config: EvalConfig, data: DataConfig, stats: ReferenceStats | None = None):
    """The FID against the study's reference set, and the dataset the samples imitate. For
    latents the reference is real images drawn with the evaluation's seed from the folder the
    latents were made from (``config.reference_images`` if set); its key names that folder's
    file list, the seed and the count, so cached statistics are used without reading an image."""
    if data.name == "latents":
        latents = load_dataset(data, "train")
        images = lambda: latents.reference_images(config.num_samples, seed=config.seed,  # noqa: E731
                                                  images=config.reference_images)
        key = f"{data.name}-{latents.meta['files_sha256'][:12]}-seed{config.seed}"
        return FID(config.fid, images, key, stats, trust_key=True), latents
    dataset = load_dataset(data, "reference")
    return FID(config.fid, dataset, f"{data.name}-reference-{data.resolution}", stats), dataset


def reference_statistics(config: EvalConfig, data: DataConfig) -> ReferenceStats:
    """The study's FID reference statistics (cached, or computed once): what the driver shares
    with every trial, so that no worker reads the reference images."""
    return _reference(config, data)[0].reference_stats


GRID_SAMPLES = 100


class Evaluator:
    """Scores variants of one dataset on the same noise and labels.

    Built once per worker: reference statistics are given (``reference``, from the driver) or
    come from the cache, the VAE (for latents) is loaded once; a bad FID setting fails here,
    before any sampling."""

    def __init__(self, config: EvalConfig, data: DataConfig, device: torch.device,
                 reference: ReferenceStats | None = None):
        self.config, self.device = config, torch.device(device)
        self.vae = None
        self.fid, dataset = _reference(config, data, reference)
        if data.name == "latents":
            from .latents import decode_latents, load_vae

            self.vae = load_vae(config.vae or dataset.meta["vae"], self.device)
            self._decode = lambda z: decode_latents(self.vae, z, dataset.scale_factor, dataset.shift_factor)
        self.shape, self.num_classes = dataset.shape, dataset.num_classes
        self.noise = fixed_noise(config.num_samples, self.shape, config.seed)
        self.labels = fixed_labels(config.num_samples, self.num_classes, config.seed)

    @property
    def solver(self) -> SolverConfig:
        """The ODE solver settings of the evaluation: method, steps, guidance and the speed
        switches (bf16, CUDA graphs, torch.compile)."""
        c = self.config
        return SolverConfig(steps=c.steps, solver=c.solver, guidance=c.guidance, bf16=c.bf16,
                            cuda_graphs=c.cuda_graphs and self.device.type == "cuda", compile=c.compile)

    def sample(self, model, schedule: Schedule, solver: SolverConfig | None = None, start: int = 0,
               count: int | None = None) -> torch.Tensor:
        """Evaluation samples ``start`` .. ``start + count`` (one batch by default) as images in
        [-1, 1] (decoded where the data are latents), on the CPU."""
        count = self.config.batch_size if count is None else count
        noise = self.noise[start:start + count].to(self.device)
        labels = self.labels[start:start + count].to(self.device)
        x = sample(model, schedule, noise, labels, solver or self.solver)
        return (self._decode(x) if self.vae is not None else x.clamp(-1, 1)).float().cpu()

    def __call__(self, model, schedule: Schedule, solver: SolverConfig | None = None) -> EvalResult:
        """Sample every evaluation sample, batch by batch, and score them. Each batch becomes FID
        features at once: memory holds features, never all the images (10,000 decoded ImageNet
        samples would take 7.9 GB as floats); the first GRID_SAMPLES images are kept for a grid."""
        from tqdm import tqdm

        solver = solver or self.solver
        features, grid, sampling, extracting = [], [], 0.0, 0.0
        total, size = self.config.num_samples, self.config.batch_size
        with tqdm(total=total, unit="sample", desc=f"sampling {schedule}", dynamic_ncols=True,
                  disable=not self.config.fid.progress) as bar:
            for start in range(0, total, size):
                began = time.perf_counter()
                images = self.sample(model, schedule, solver, start, size)  # on the CPU: synchronised
                sampling += time.perf_counter() - began
                began = time.perf_counter()
                features.append(self.fid.features(images))
                extracting += time.perf_counter() - began
                if sum(len(g) for g in grid) < GRID_SAMPLES:
                    grid.append(images[:GRID_SAMPLES])
                bar.update(len(images))
        began = time.perf_counter()
        fid = self.fid.score_features(torch.cat(features), self.labels)
        cost = sample_cost(model.config, schedule, solver)
        base = sample_cost(model.config, Schedule.from_stages([model.config.base_patch]), solver)
        return EvalResult(str(schedule), fid, cost.gmacs, cost.macs / base.macs,
                          {"steps": solver.steps, "solver": solver.solver, "guidance": solver.guidance,
                           "bf16": solver.bf16, "cuda_graphs": solver.cuda_graphs, "compile": solver.compile,
                           "seed": self.config.seed},
                          sampling, extracting + time.perf_counter() - began, torch.cat(grid)[:GRID_SAMPLES])


def save_grid(images: torch.Tensor, path, title: str | None = None, nrow: int = 10, min_cell: int = 64) -> None:
    """A PNG grid of images in [-1, 1], each cell at least ``min_cell`` pixels (small images are
    enlarged without smoothing), under a line saying what made them."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    cells = images[: nrow * nrow].float().clamp(-1, 1)
    scale = max(1, -(-min_cell // cells.shape[-1]))
    cells = torch.nn.functional.interpolate(cells, scale_factor=scale, mode="nearest") if scale > 1 else cells
    grid = make_grid((cells + 1) / 2, nrow=nrow, padding=2 * scale, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
    if title:
        band = 28
        framed = Image.new("RGB", (picture.width, picture.height + band), "white")
        framed.paste(picture, (0, band))
        ImageDraw.Draw(framed).text((8, 8), title, fill="black")
        picture = framed
    picture.save(str(path))
