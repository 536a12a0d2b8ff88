"""FID at both scales through one code path: images in [-1, 1] become uint8, a torch-fidelity
feature extractor maps them to features, and torch-fidelity's own code turns the features
into Gaussian statistics and the Frechet distance.

- ``digits`` (embedded): ppsearch's digits classifier (``ppsearch.features``), registered with
  torch-fidelity as ``ppsearch-digits``; its shipped weights unless a path is given.
- ``inception`` (cluster): torch-fidelity's ``inception-v3-compat`` with weights from the local
  file ``feature_extractor_weights_path`` (pytorch-fid's pt_inception-2015-12-05-6726825d.pth
  holds the same tensors). Nothing is downloaded: a missing file is an error before sampling.

Reference statistics are cached per (dataset key, extractor, feature layer, image shape,
reference count) as a safetensors file that also stores the sha256 of the reference images
(as uint8) and of the extractor weights. A file whose hashes differ is rebuilt, never reused.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import MissingFileError, PPSearchError

EXTRACTORS = {"digits": "ppsearch-digits", "inception": "inception-v3-compat"}
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FIDError(PPSearchError):
    """An FID setting or input that cannot be used, with the reason."""


def default_cache_dir() -> Path:
    """``$PPSEARCH_CACHE/fid``, else ``~/.cache/ppsearch/fid``."""
    root = os.environ.get("PPSEARCH_CACHE")
    return Path(root) / "fid" if root else Path.home() / ".cache" / "ppsearch" / "fid"


@dataclass
class FIDConfig:
    """How FID is measured; the sampler settings belong to the caller's record."""

    extractor: str = "digits"  # "digits" or "inception"
    # digits: None uses the shipped weights; inception: required, a local INCEPTION_WEIGHTS_FILE
    feature_extractor_weights_path: str | None = None
    feature_layer: str | None = None  # None: the extractor's FID layer ("128" digits, "2048" inception)
    num_splits: int = 5  # disjoint splits of the samples for the noise estimate; 0 or 1: none
    batch_size: int = 256
    cache_dir: str | None = None  # None: default_cache_dir()
    device: str | None = None  # None: cuda when available
    progress: bool = False  # a progress bar while features are extracted

    def __post_init__(self):
        if self.extractor not in EXTRACTORS:
            raise FIDError(f"unknown FID extractor {self.extractor!r}: one of {', '.join(EXTRACTORS)}")
        if self.num_splits < 0:
            raise FIDError(f"FID num_splits must be 0 or more, got {self.num_splits}")
        if self.batch_size < 1:
            raise FIDError(f"FID batch_size must be positive, got {self.batch_size}")

    @property
    def extractor_name(self) -> str:
        """The name torch-fidelity knows the extractor by; it goes into every result."""
        return EXTRACTORS[self.extractor]

    def check(self) -> Path:
        """The weights file, after checking that it exists; call it before spending compute."""
        path = self.feature_extractor_weights_path
        if self.extractor == "inception":
            if not path:
                raise FIDError(f"FID with the inception extractor needs feature_extractor_weights_path: a local "
                               f"copy of {INCEPTION_WEIGHTS_FILE} (pytorch-fid's Inception weights); "
                               f"ppsearch never downloads it")
            if not Path(path).is_file():
                raise MissingFileError(f"feature_extractor_weights_path {path} does not exist "
                                        f"(expected {INCEPTION_WEIGHTS_FILE}, pytorch-fid's Inception weights)")
            return Path(path)
        from .features import DEFAULT_WEIGHTS

        if path and not Path(path).is_file():
            raise MissingFileError(f"feature_extractor_weights_path {path} does not exist "
                                    f"(digits classifier weights from `ppsearch features --out`)")
        if not path and not DEFAULT_WEIGHTS.is_file():
            raise MissingFileError(f"the shipped digits classifier weights {DEFAULT_WEIGHTS} are missing; "
                                    f"reinstall ppsearch or set feature_extractor_weights_path")
        return Path(path) if path else DEFAULT_WEIGHTS


@dataclass
class FIDResult:
    """One FID measurement and what it was measured with.

    ``fid_std`` is the noise estimate: the standard deviation of FID over ``num_splits``
    disjoint equal splits of the samples (``split_fids``, each against the same reference),
    divided by sqrt(num_splits) to stand for ``num_samples`` samples. It covers the samples'
    noise only (the reference is shared by every trial). Two FIDs differ beyond noise when
    their gap exceeds about twice the root sum of squares of their ``fid_std``. On the digits
    it matched the spread of FID over independent sample sets where FID is large, and
    overstated it about 2.5 times near FID 0 (where FID's noise falls as 1/N, not 1/sqrt(N)).
    """

    fid: float
    fid_std: float | None
    num_samples: int
    num_splits: int
    split_fids: list[float]
    extractor: str
    extractor_weights: str  # file name and the first 12 hex digits of its sha256
    feature_layer: str
    reference_key: str
    reference_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to [0, 255] uint8, as images saved to disk would be; uint8 stays as is."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _image_batches(reference, batch_size: int):
    """Batches of images from a tensor, a dataset with ``.images``, or any dataset of images
    or (image, label) pairs."""
    images = reference if torch.is_tensor(reference) else getattr(reference, "images", None)
    if images is not None:
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    for batch in DataLoader(reference, batch_size=batch_size):
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


@dataclass
class ReferenceStats:
    """The reference side of FID, computed once (by the driver) and shared with every trial:
    mean and covariance of the reference features, and what they were computed with."""

    mu: np.ndarray
    sigma: np.ndarray
    reference_key: str
    reference_samples: int
    reference_shape: tuple[int, ...]
    extractor_fingerprint: str
    feature_layer: str


class FID:
    """FID of samples against one reference set, whose statistics are computed once (or
    read from the cache, or given as ``stats``) when this is built. The extractor and its
    weights are checked here, so a bad setting fails before any sampling.

    ``reference``: the reference images (a tensor or dataset), or a function returning them.
    ``trust_key``: the dataset key names the reference's content (a file list's hash, a seed),
    so a cache file of the same key, extractor and count is used without reading the images;
    otherwise the images are hashed and a cache file is used only when the hash matches."""

    def __init__(self, config: FIDConfig, reference, dataset_key: str, stats: ReferenceStats | None = None,
                 trust_key: bool = False):
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor

        from .features import file_digest  # importing it registers ppsearch-digits

        self.config = config
        weights = config.check()
        name = config.extractor_name
        provided = FEATURE_EXTRACTORS_REGISTRY[name].get_provided_features_list()
        self.feature_layer = config.feature_layer or FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        if self.feature_layer not in provided:
            raise FIDError(f"feature_layer {self.feature_layer!r} is not one of {name}'s: {', '.join(provided)}")
        if config.extractor == "inception":
            _check_state_dict_file(weights)
        digest = file_digest(weights)
        self.extractor_weights = f"{weights.name}:{digest[:12]}"
        self._extractor_fingerprint = f"{name}:{digest}:torch-fidelity {torch_fidelity.__version__}"
        try:
            self.extractor = create_feature_extractor(name, [self.feature_layer], cuda=False, verbose=False,
                                                      feature_extractor_weights_path=str(weights))
        except RuntimeError as err:  # load_state_dict's report; its second line lists the keys
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
            raise FIDError(f"{weights} does not hold {name} weights: {lines[min(1, len(lines) - 1)][:160]}") from None
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.extractor.to(self.device)
        if stats is not None and (stats.extractor_fingerprint, stats.feature_layer) == (
                self._extractor_fingerprint, self.feature_layer):
            self.mu, self.sigma, self.stats_from_cache = stats.mu, stats.sigma, True
            self.reference_key, self.reference_samples = stats.reference_key, stats.reference_samples
            self.reference_shape = tuple(stats.reference_shape)
            return
        reference = reference() if callable(reference) else reference
        self.reference_samples = len(reference)
        if self.reference_samples < 2:
            raise FIDError(f"FID needs at least 2 reference images, got {self.reference_samples}")
        self.reference_shape = tuple(next(_image_batches(reference, 1)).shape[1:])
        self._check_shape(self.reference_shape, "reference")
        shape = "x".join(map(str, self.reference_shape))
        self.reference_key = f"{_safe(dataset_key)}-{name}-{self.feature_layer}-{shape}-n{self.reference_samples}"
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.cache_path = cache_dir / f"{self.reference_key}.safetensors"
        self.mu, self.sigma, self.stats_from_cache = self._reference_stats(reference, trust_key)

    @property
    def reference_stats(self) -> ReferenceStats:
        return ReferenceStats(self.mu, self.sigma, self.reference_key, self.reference_samples, self.reference_shape,
                              self._extractor_fingerprint, self.feature_layer)

    # -- features and statistics ---------------------------------------------------------------

    def _check_shape(self, shape, what):
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise FIDError(f"FID takes images (N, 1 or 3, H, W) in [-1, 1]; the {what} has shape (N, "
                           f"{', '.join(map(str, shape))}) (latents must be decoded first)")

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        images = to_uint8(images).cpu()  # hashed on the CPU, extracted on self.device
        if self.config.extractor == "inception" and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images

    @torch.no_grad()
    def _features(self, batches, total: int, digest=None) -> torch.Tensor:
        """Features (N, D) in float64; ``digest`` is fed the uint8 images on the way."""
        from tqdm import tqdm

        out = []
        with tqdm(total=total, unit="img", desc=f"FID features ({self.config.extractor_name})",
                  disable=not self.config.progress) as bar:
            for batch in batches:
                images = self._input(batch)
                if digest is not None:
                    digest.update(images.contiguous().numpy().tobytes())
                out.append(self.extractor(images.to(self.device))[0].double().cpu())
                bar.update(len(batch))
        return torch.cat(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of samples (N, C, H, W) in [-1, 1], as FID sees them: (N, D) float64.
        Samples too many to hold at once can go through in parts, then ``score_features``."""
        if tuple(images.shape[1:]) != self.reference_shape:
            raise FIDError(f"samples have shape {tuple(images.shape[1:])} but the reference "
                           f"{self.reference_key} has {self.reference_shape}")
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        if bad:
            raise FloatingPointError(f"{bad} of {len(images)} samples are not finite")
        return self._features(_image_batches(images, self.config.batch_size), len(images))

    @staticmethod
    def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of ``features``, by torch-fidelity."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(features.double().cpu())
        return stats["mu"], stats["sigma"]

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """Frechet distance of a Gaussian to the reference one, by torch-fidelity."""
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        return fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": self.mu, "sigma": self.sigma},
                                        verbose=False)[KEY_METRIC_FID]

    def _reference_stats(self, reference, trust_key: bool):
        """Mean and covariance of the reference features, and whether they came from the cache.
        A cache file is only trusted once the reference's hash matches, so without one the
        hash and the features are computed in a single pass."""
        expected = {"extractor": self._extractor_fingerprint, "feature_layer": self.feature_layer,
                    "num_samples": str(self.reference_samples)}
        batches = lambda: _image_batches(reference, self.config.batch_size)  # noqa: E731
        digest = hashlib.sha256()
        cached = _read_stats(self.cache_path)
        if cached is not None and trust_key and all(cached[2].get(k) == v for k, v in expected.items()):
            return cached[0], cached[1], True
        if cached is not None:
            for batch in batches():
                digest.update(self._input(batch).contiguous().numpy().tobytes())
            expected["reference_sha256"] = digest.hexdigest()
            mu, sigma, metadata = cached
            if all(metadata.get(k) == v for k, v in expected.items()):
                return mu, sigma, True
            features = self._features(batches(), self.reference_samples)
        else:
            features = self._features(batches(), self.reference_samples, digest)
            expected["reference_sha256"] = digest.hexdigest()
        mu, sigma = self.statistics(features)
        _write_stats(self.cache_path, mu, sigma, expected)
        return mu, sigma, False

    # -- scoring -------------------------------------------------------------------------------

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> FIDResult:
        """FID of samples (N, C, H, W) in [-1, 1] against the reference, with a noise estimate.
        With ``labels`` the splits are stratified by class; without, they are contiguous
        chunks, so the samples' order should mix the classes."""
        return self.score_features(self.features(images), labels)

    def score_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> FIDResult:
        """``score`` from the samples' ``features``."""
        n, k = len(features), max(self.config.num_splits, 1)
        if n < 2 * k:
            raise FIDError(f"FID with {k} split(s) needs at least {2 * k} samples, got {n}")
        fid = self.distance(*self.statistics(features))
        split_fids, fid_std = [], None
        if k > 1:
            split_fids = [self.distance(*self.statistics(features[index])) for index in _splits(n, k, labels)]
            fid_std = float(np.std(split_fids, ddof=1) / math.sqrt(k))
        return FIDResult(fid=fid, fid_std=fid_std, num_samples=n, num_splits=len(split_fids), split_fids=split_fids,
                         extractor=self.config.extractor_name, extractor_weights=self.extractor_weights,
                         feature_layer=self.feature_layer, reference_key=self.reference_key,
                         reference_samples=self.reference_samples)


def _splits(n: int, k: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """``k`` disjoint index sets of (nearly) equal size: chunks, or each class dealt in turn."""
    if labels is None:
        return list(torch.arange(n).chunk(k))
    if len(labels) != n:
        raise FIDError(f"got {len(labels)} labels for {n} samples")
    order = torch.cat([torch.nonzero(labels.cpu() == c).flatten() for c in labels.unique()])
    return [order[i::k] for i in range(k)]


def _check_state_dict_file(path: Path) -> None:
    """Refuse anything but a plain state dict of tensors before torch-fidelity, which
    unpickles without restriction, opens it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # foreign or corrupt file: one clear line, whatever torch raised
        raise FIDError(f"cannot read {path} (feature_extractor_weights_path) as a state dict of tensors: "
                       f"{type(err).__name__}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FIDError(f"{path} (feature_extractor_weights_path) holds no state dict of tensors")


def _read_stats(path: Path):
    """(mu, sigma, metadata) from a cache file, or None when it is absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("mu").numpy(), f.get_tensor("sigma").numpy(), f.metadata() or {}
    except Exception:  # a torn or foreign file is rebuilt like a stale one
        return None


def _write_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, metadata: dict) -> None:
    """Write then rename, so that workers sharing the cache never read half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
