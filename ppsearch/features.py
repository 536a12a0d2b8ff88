"""The feature extractor of the embedded FID: a small conv net that classifies the 16x16
digits, trained by ppsearch itself (``ppsearch features``); its 128-wide penultimate layer is
the feature space, as Inception's 2048-wide pool layer is at cluster scale. The trained
weights ship in ``ppsearch/assets/``. Importing this module registers the extractor with
torch-fidelity as ``ppsearch-digits``.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .data import load_digits, resize
from .errors import MissingFileError, PPSearchError

EXTRACTOR_NAME = "ppsearch-digits"
DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "digits_classifier.safetensors"
INPUT_SIDE = 16
FEATURES = 128
NUM_CLASSES = 10


class FeatureWeightsError(PPSearchError):
    """A feature extractor weights file that cannot be used, with the reason."""


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------

def _conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))


class DigitsClassifier(nn.Module):
    """Four 3x3 convs and two pools over 1x16x16 digits in [-1, 1], then a 128-wide layer
    (the FID features) and a linear head over the 10 classes."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.convs = nn.Sequential(
            _conv(1, width), _conv(width, width), nn.MaxPool2d(2),
            _conv(width, 2 * width), _conv(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width * (INPUT_SIDE // 4) ** 2, FEATURES)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose predicted class is their label."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or 1 pixel along each axis, background filling the gap:
    4,000 digits are few, and shifts keep the net from learning pixel positions by heart."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_digits_classifier(epochs: int = 12, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                            log: Callable[[str], None] | None = print) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the digits' train split; returns it (in eval mode) and a report
    with its accuracy on the reference split. Deterministic for a seed; the global RNG is
    left as it was."""
    if epochs < 1:
        raise PPSearchError(f"epochs must be at least 1, got {epochs}")
    train, reference = load_digits("train"), load_digits("reference")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # trains on the CPU: no CUDA RNG to save
        torch.manual_seed(seed)  # initialisation and dropout
        model = DigitsClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            total = 0.0
            for i in range(0, len(train), batch_size):
                index = order[i:i + batch_size]
                loss = F.cross_entropy(model(_shift(train.images[index], generator)), train.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(index)
            elapsed = time.perf_counter() - start
            ref_acc = accuracy(model, reference.images, reference.labels)
            if log:
                log(f"epoch {epoch}/{epochs}  loss {total / len(train):.4f}  reference accuracy {100 * ref_acc:.2f}%  "
                    f"{epoch * len(train) / elapsed:.0f} img/s  ETA {elapsed / epoch * (epochs - epoch):.0f} s")
    model.eval()
    report = {"reference_accuracy": ref_acc, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_seconds": round(time.perf_counter() - start, 1)}
    return model, report


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def save_digits_classifier(model: DigitsClassifier, path: str | Path, report: dict | None = None) -> None:
    """Write the weights as safetensors; ``report`` goes into the metadata."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in (report or {}).items()})


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The classifier with the weights at ``path`` (the shipped ones when None), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise MissingFileError(f"digits classifier weights not found: {path} (make them with `ppsearch features --out`)")
    try:
        state = load_file(str(path))
    except Exception as err:  # foreign or corrupt file: one clear line, whatever safetensors raised
        raise FeatureWeightsError(f"cannot read digits classifier weights {path}: {err}") from None
    model = DigitsClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise FeatureWeightsError(f"{path} does not hold digits classifier weights: {str(err).splitlines()[1].strip()}") from None
    return model.eval()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# torch-fidelity feature extractor
# ----------------------------------------------------------------------------------------------

class DigitsFeatureExtractor(FeatureExtractorBase):
    """The classifier as a torch-fidelity extractor. Like Inception there, it takes uint8
    images (N, 1 or 3, H, W) in [0, 255] and resizes them to its input side; colour is
    averaged to grey. Features: "128" (penultimate, for FID) and "logits"."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx1xHxW or Bx3xHxW: {tuple(x.shape)}")
        x = x.float().mean(1, keepdim=True) / 127.5 - 1
        features = self.classifier.features(resize(x, INPUT_SIDE))
        out = {str(FEATURES): features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return str(FEATURES), "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": str(FEATURES), "kid": str(FEATURES), "prc": str(FEATURES)}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, INPUT_SIDE, INPUT_SIDE, dtype=torch.uint8)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # torch-fidelity refuses a second registration
    register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
