"""VAE latent datasets (the cluster scale): an ImageNet-style image folder encoded once by a
Stable Diffusion VAE into safetensors shards, read back as (latent, label) pairs.

Layout of one split, ``OUT/<split>/``::

    meta.json                  scale factor, latent shape, classes, image folder, VAE hash, ...
    shard-00000.safetensors    latents (N, C, H, W) float32 or float16, already scaled; labels (N,) int64
    shard-00001.safetensors    ...

Shard k holds samples [k * shard_size, (k + 1) * shard_size) of the image folder's order
(classes in sorted folder order, files sorted in each class). Latents are the mean of the
VAE's posterior, not a sample: encoding is deterministic and a rerun gives the same shards.
The scaled latents are the data x1 of flow matching; decode with ``decode_latents`` (same
scale factor) before FID.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import PPSearchError

SD_SCALE_FACTOR = 0.18215
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMAT = "ppsearch-latents/1"
META = "meta.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16"}
_VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class LatentsError(PPSearchError):
    """An image folder, VAE or latent dataset that cannot be used, with the reason."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


#################################################################################
#                                  Image folders                                #
#################################################################################

def center_crop(image, image_size: int):
    """ADM's center crop (as DiT and the ImageNet FID reference batches use): halve with a
    box filter while the short side is at least twice the target, resize the short side to
    ``image_size`` with bicubic, then crop the center square."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """One image as uint8 (3, image_size, image_size), center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = center_crop(image.convert("RGB"), image_size)
    except Exception as err:  # truncated or foreign file: name it, whatever PIL raised
        raise LatentsError(f"cannot read image {path}: {_first_line(err)}") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1


class ImageFolder(Dataset):
    """``root/<class_name>/*.{jpg,jpeg,png}``; class index = position in sorted class names.
    Items: (image uint8 (3, S, S), center-cropped, label int64); ``to_unit_range`` makes the
    VAE's input (after the copy to the device: uint8 moves a quarter of the bytes)."""

    def __init__(self, root: str | Path, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise LatentsError(f"image folder not found: {root}")
        if image_size < 1:
            raise LatentsError(f"image size must be positive, got {image_size}")
        self.root, self.image_size = root.resolve(), image_size
        with os.scandir(root) as entries:
            self.classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise LatentsError(f"{root} has no class folders: expected {root}/<class_name>/<image>.jpg")
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            with os.scandir(root / name) as entries:  # no stat per file: ImageNet has 1.28M
                files = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                empty.append(name)
            self.samples += [(f"{name}/{f}", label) for f in files]
        if not self.samples:
            raise LatentsError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        if empty:
            # dropping a class would shift every later label; a labelled dataset needs them all
            raise LatentsError(f"{root}: class folder(s) without images: {', '.join(empty[:5])}"
                               + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        rel, label = self.samples[index]
        return load_image(self.root / rel, self.image_size), torch.tensor(label)

    def files_sha256(self) -> str:
        """Hash of the ordered (file, label) list: shards are only valid for this order."""
        digest = hashlib.sha256()
        for rel, label in self.samples:
            digest.update(f"{rel}\t{label}\n".encode())
        return digest.hexdigest()


class _UInt8Images(Dataset):
    """Chosen images of a folder as uint8 (3, S, S): torch-fidelity's input convention."""

    def __init__(self, folder: ImageFolder, indices: list[int]):
        self.folder, self.indices = folder, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.folder[self.indices[index]][0]


#################################################################################
#                                       VAE                                     #
#################################################################################

def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (config.json + weights), in eval mode.
    Never downloads."""
    path = Path(path)
    what = ("a local diffusers AutoencoderKL folder with config.json and "
            "diffusion_pytorch_model.safetensors, e.g. a copy of stabilityai/sd-vae-ft-ema")
    if not path.exists():
        raise LatentsError(f"VAE not found: {path}: give {what}")
    if not path.is_dir():
        raise LatentsError(f"VAE {path} is a file: give {what}")
    if not (path / "config.json").is_file():
        raise LatentsError(f"VAE folder {path} has no config.json: give {what}")
    if not any((path / name).is_file() for name in _VAE_WEIGHTS):
        raise LatentsError(f"VAE folder {path} has no weights ({' or '.join(_VAE_WEIGHTS)})")
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise LatentsError(f"the VAE needs diffusers ({_first_line(err)}): pip install 'ppsearch[vae]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # broken config or weights: one line, whatever diffusers raised
        raise LatentsError(f"cannot load VAE from {path}: {_first_line(err)}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factors(vae) -> tuple[float, float]:
    """(scale, shift) of the VAE's latent space; SD VAEs: (0.18215, 0)."""
    scale = getattr(vae.config, "scaling_factor", None) or SD_SCALE_FACTOR
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def vae_downsampling(vae) -> int:
    """Image pixels per latent pixel along each side (8 for SD VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> scaled latents float32 (N, C, H/f, W/f): the
    posterior mean (deterministic), shifted and scaled by the VAE's factors."""
    if images.dim() != 4 or images.shape[1] != vae.config.in_channels:
        raise LatentsError(f"expected images (N, {vae.config.in_channels}, H, W), got {tuple(images.shape)}")
    scale, shift = vae_factors(vae)
    param = next(vae.parameters())
    mean = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist.mean
    return ((mean - shift) * scale).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale_factor: float | None = None,
                   shift_factor: float | None = None) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images float32 (N, 3, h*f, w*f) clipped to [-1, 1].
    Factors default to the VAE's; pass a dataset's ``scale_factor`` to undo exactly its scaling."""
    scale, shift = vae_factors(vae)
    scale = scale if scale_factor is None else scale_factor
    shift = shift if shift_factor is None else shift_factor
    param = next(vae.parameters())
    images = vae.decode(latents.to(device=param.device, dtype=param.dtype) / scale + shift).sample
    return images.float().clamp(-1, 1)


def _vae_sha256(path: Path) -> str:
    """Hash of the VAE folder's config and weight files, so shards name the VAE that made them."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name == "config.json" or p.name in _VAE_WEIGHTS):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


#################################################################################
#                                   Latent shards                               #
#################################################################################

def _open_shard(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # truncated or foreign file
        raise LatentsError(f"corrupt shard {path}: {_first_line(err)}") from None


def _check_shard(handle, path: Path, shape: tuple[int, ...], dtype: str, count: int) -> None:
    """Raise unless the shard holds ``count`` latents of ``shape`` and ``dtype`` and as many labels."""
    keys = set(handle.keys())
    if not {"latents", "labels"} <= keys:
        raise LatentsError(f"shard {path} lacks tensor(s) {sorted({'latents', 'labels'} - keys)}")
    latents, labels = handle.get_slice("latents"), handle.get_slice("labels")
    got = tuple(latents.get_shape())
    if got[1:] != shape or len(got) != 4:
        raise LatentsError(f"shard {path} has latents of shape {got}, expected (N, {', '.join(map(str, shape))})")
    if _SAFETENSORS_DTYPES.get(latents.get_dtype()) != dtype:
        raise LatentsError(f"shard {path} has latents of dtype {latents.get_dtype()}, expected {dtype}")
    if tuple(labels.get_shape()) != (got[0],) or labels.get_dtype() != "I64":
        raise LatentsError(f"shard {path} has labels {labels.get_dtype()}{tuple(labels.get_shape())}, "
                           f"expected I64({got[0]},) to match its {got[0]} latents")
    if got[0] != count:
        raise LatentsError(f"shard {path} holds {got[0]} samples, expected {count}")


def _shard_counts(num_samples: int, shard_size: int) -> list[int]:
    return [min(shard_size, num_samples - start) for start in range(0, num_samples, shard_size)]


class LatentShards(Dataset):
    """Precomputed latents of one split. Items: (latent float32 (C, H, W), already scaled,
    label int64). Shards are memory-mapped and read one item at a time; labels are loaded
    at once (8 bytes a sample)."""

    def __init__(self, path: str | Path, split: str = "train"):
        root = Path(path)
        if not root.is_dir():
            raise LatentsError(f"latent dataset not found: {root}")
        self.path = root / split
        meta_path = self.path / META
        if not meta_path.is_file():
            splits = sorted(d.name for d in root.iterdir() if (d / META).is_file())
            hint = f"splits there: {', '.join(splits)}" if splits else "make one with `ppsearch latents`"
            raise LatentsError(f"no split {split!r} in {root} (no {meta_path}); {hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.shape = tuple(int(s) for s in self.meta["latent_shape"])
            self.num_classes = int(self.meta["num_classes"])
            self.scale_factor = float(self.meta["scale_factor"])
            self.shift_factor = float(self.meta["shift_factor"])
            counts = _shard_counts(int(self.meta["num_samples"]), int(self.meta["shard_size"]))
            dtype = self.meta["dtype"]
        except (ValueError, KeyError, TypeError) as err:
            raise LatentsError(f"bad {meta_path}: {_first_line(err)}") from None
        if self.meta.get("format") != FORMAT:
            raise LatentsError(f"{meta_path} is not a {FORMAT} dataset")
        if not self.meta.get("complete"):
            raise LatentsError(f"{self.path} is incomplete: rerun the `ppsearch latents` command "
                               "that made it to finish it")
        names = [_shard_name(k) for k in range(len(counts))]
        extra = sorted({p.name for p in self.path.glob("shard-*.safetensors")} - set(names))
        if extra:
            raise LatentsError(f"{self.path} has shard(s) {', '.join(extra)} "
                               f"beyond the {len(names)} its meta.json lists")
        labels = []
        for name, count in zip(names, counts):
            file = self.path / name
            if not file.is_file():
                raise LatentsError(f"missing shard {file} ({len(names)} expected)")
            handle = _open_shard(file)
            _check_shard(handle, file, self.shape, dtype, count)
            labels.append(handle.get_tensor("labels"))
        self.labels = torch.cat(labels)
        bad = (self.labels < 0) | (self.labels >= self.num_classes)
        if bad.any():
            at = int(bad.nonzero()[0])
            raise LatentsError(f"shard {self.path / names[at // counts[0]]} has label {int(self.labels[at])} "
                               f"outside [0, {self.num_classes})")
        self._files = [self.path / name for name in names]
        self._shard_size = counts[0]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        index %= len(self)
        k, row = divmod(index, self._shard_size)
        if k not in self._handles:  # opened lazily: each DataLoader worker maps its own
            self._handles[k] = _open_shard(self._files[k])
        return self._handles[k].get_slice("latents")[row].float(), self.labels[index]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}  # safetensors handles do not pickle

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def reference_images(self, n: int | None = None, seed: int = 0, images: str | Path | None = None) -> Dataset:
        """``n`` real images (all when None) drawn without replacement with ``seed`` from the
        image folder the latents came from, center-cropped like the latents, as uint8
        (3, S, S): the reference side of FID. ``images`` overrides the folder in meta.json
        (e.g. the same images mounted elsewhere); its file list must be unchanged."""
        folder = ImageFolder(images or self.meta["images"], self.image_size)
        if folder.files_sha256() != self.meta["files_sha256"]:
            raise LatentsError(f"image folder {folder.root} no longer lists the {len(self)} images "
                               f"the latents in {self.path} were made from")
        if n is None:
            return _UInt8Images(folder, list(range(len(folder))))
        if not 0 < n <= len(folder):
            raise LatentsError(f"asked for {n} reference images; {folder.root} has {len(folder)}")
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))
        return _UInt8Images(folder, sorted(order[:n].tolist()))


#################################################################################
#                                  Precomputation                               #
#################################################################################

def _prepare_out(out: Path, meta: dict, overwrite: bool) -> set[int]:
    """Make ``out`` ready; return the shards already written by an earlier run of the same job
    (all of them when it finished: rerunning a finished job checks it and does nothing)."""
    if out.exists() and not out.is_dir():
        raise LatentsError(f"output {out} is a file, not a folder")
    if overwrite and out.is_dir():
        for p in out.iterdir():  # only what this job writes; anything else is the user's
            if p.name == META or p.name.startswith(("shard-", ".shard-")):
                p.unlink()
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return set()
    try:
        old = json.loads((out / META).read_text()) if (out / META).is_file() else None
    except ValueError:
        old = None
    old = old if isinstance(old, dict) else None
    same_job = ("format", "images", "image_size", "files_sha256", "vae_sha256", "shard_size", "dtype")
    if old is None or any(old.get(k) != meta[k] for k in same_job):
        why = "holds latents made with other settings" if old else "is not empty"
        raise LatentsError(f"output folder {out} {why}: pass --overwrite to replace them, or choose another --out")
    done = set()
    for k, count in enumerate(_shard_counts(meta["num_samples"], meta["shard_size"])):
        file = out / _shard_name(k)
        if file.is_file():
            try:
                _check_shard(_open_shard(file), file, tuple(meta["latent_shape"]), meta["dtype"], count)
            except LatentsError as err:
                # shards are renamed into place whole, so a bad one was damaged since: say so, not redo it
                raise LatentsError(f"{err}; delete it to have it encoded again") from None
            done.add(k)
    return done


def precompute_latents(images: str | Path, vae: str | Path, out: str | Path, split: str = "train",
                       image_size: int = 256, batch_size: int = 64, shard_size: int = 16384,
                       device: str | None = None, dtype: str = "float32", workers: int | None = None,
                       overwrite: bool = False) -> Path:
    """Encode every image of ``images`` into shards under ``out/split``; returns that folder.
    ``workers`` processes decode images (default: up to 8) while the VAE encodes.

    Shards are written whole (to a temporary name, then renamed), so an interrupted run
    resumes where it stopped when the same command is run again.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise LatentsError("batch size and shard size must be positive, workers non-negative")
    if dtype not in _DTYPES:
        raise LatentsError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentsError("--device cuda, but CUDA is not available here")
    folder = ImageFolder(images, image_size)
    vae_path = Path(vae).resolve()
    model = load_vae(vae_path, device)
    factor = vae_downsampling(model)
    if image_size % factor:
        raise LatentsError(f"image size {image_size} is not a multiple of the VAE's downsampling {factor}")
    scale, shift = vae_factors(model)
    counts = _shard_counts(len(folder), shard_size)
    meta = {
        "format": FORMAT, "split": split, "complete": False,
        "images": str(folder.root), "image_size": image_size, "num_samples": len(folder),
        "num_classes": len(folder.classes), "classes": folder.classes, "files_sha256": folder.files_sha256(),
        "latent_shape": [model.config.latent_channels, image_size // factor, image_size // factor],
        "scale_factor": scale, "shift_factor": shift, "dtype": dtype, "shard_size": shard_size,
        "num_shards": len(counts),
        "encoding": "posterior mean, ADM center crop", "vae": str(vae_path), "vae_sha256": _vae_sha256(vae_path),
    }
    out = Path(out) / split
    done = _prepare_out(out, meta, overwrite)
    (out / META).write_text(json.dumps(meta, indent=1))

    todo = [k for k in range(len(counts)) if k not in done]
    # batches never straddle shards, so each shard is finished by its own last batch
    batches = [list(range(k * shard_size + i, k * shard_size + min(i + batch_size, counts[k])))
               for k in todo for i in range(0, counts[k], batch_size)]
    loader = DataLoader(folder, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda")
    pending: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with tqdm(total=len(folder), initial=len(folder) - sum(counts[k] for k in todo), unit="img",
              desc=f"encoding {split}", dynamic_ncols=True) as bar:  # closed before an error is printed
        for batch, (x, y) in zip(batches, loader):
            latents = encode_images(model, to_unit_range(x.to(device, non_blocking=True)))
            pending.append(latents.to("cpu", _DTYPES[dtype]))
            labels.append(y)
            bar.update(len(batch))
            k = batch[0] // shard_size
            if batch[-1] + 1 == k * shard_size + counts[k]:
                tmp = out / f".shard-{k:05d}.tmp"
                save_file({"latents": torch.cat(pending).contiguous(), "labels": torch.cat(labels)}, str(tmp))
                os.replace(tmp, out / _shard_name(k))
                pending, labels = [], []
    meta["complete"] = True
    (out / META).write_text(json.dumps(meta, indent=1))
    return out
