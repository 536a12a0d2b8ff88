"""Loading bases (official DiT / SiT checkpoints or ppsearch's own) and saving variants.

Official checkpoints are plain state dicts, or dicts holding ``ema`` / ``model`` (the files
DiT's and SiT's own ``train.py`` write also hold ``opt`` and ``args``, an argparse Namespace), in
``.pt`` or ``.safetensors`` files. They are read with ``weights_only=True``: tensors and plain
containers only, plus exactly the globals such a training file needs; nothing else is unpickled.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import torch

from .errors import PPSearchError
from .models import SIZES, PPFlowConfig, PPFlowDiT, parse_model_name
from .schedule import PatchShape


EMBEDDED_BASE = Path(__file__).parent / "assets" / "tiny_base.safetensors"


def base_path(base: str) -> Path:
    """The checkpoint a ``base`` setting names: a path, or "embedded" for the shipped tiny base."""
    return EMBEDDED_BASE if base == "embedded" else Path(base)


class CheckpointError(PPSearchError):
    """A checkpoint file that cannot be used as a base, with the reason."""


# Heads cannot be read off tensor shapes; the known sizes by width.
_HEADS_BY_WIDTH = {width: heads for _, width, heads in SIZES.values()}
# The only globals a checkpoint of DiT's or SiT's train.py pickles besides tensors: its args.
_TRAINING_FILE_GLOBALS = [argparse.Namespace]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a checkpoint file and its metadata (ppsearch's own files carry a config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    metadata = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            with torch.serialization.safe_globals(_TRAINING_FILE_GLOBALS):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not unsafe:
            raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
        raise CheckpointError(f"refused checkpoint {path}: its pickle needs {unsafe[1]}, which ppsearch does not "
                              f"load (a checkpoint holds tensors, containers and at most DiT/SiT's training "
                              f"args); save its state dict alone") from None
    except Exception as err:  # corrupt or foreign file: one clear line, whatever the library raised
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    if isinstance(state, dict) and "config" in state and isinstance(state["config"], dict):
        metadata = {"config": json.dumps(state["config"])}
    for key in ("ema", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    return state, metadata


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _require(state, key, path):
    if key not in state:
        raise CheckpointError(f"{path} is not a DiT/SiT checkpoint: missing tensor {key!r}")
    return state[key]


def _infer_config(state, path, model_name, num_heads) -> PPFlowConfig:
    """Sizes from tensor shapes; heads and time convention from the model name."""
    proj = _require(state, "x_embedder.proj.weight", path)
    if proj.dim() != 4:
        raise CheckpointError(f"{path}: x_embedder.proj.weight has shape {tuple(proj.shape)}, expected 4 dims")
    hidden, in_channels, ph, pw = proj.shape
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    pos = _require(state, "pos_embed", path)
    tokens = pos.shape[-2]
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid")
    num_classes = _require(state, "y_embedder.embedding_table.weight", path).shape[0] - 1
    mlp_hidden = _require(state, "blocks.0.mlp.fc1.weight", path).shape[0]
    name = parse_model_name(model_name) if model_name else parse_model_name(path, anywhere=True)
    if model_name and name is None:
        raise CheckpointError(f"unknown model name {model_name!r}: e.g. SiT-XL/2 or DiT-XL/2")
    if name:
        exp_depth, exp_hidden, heads = SIZES[name.size]
        if (exp_depth, exp_hidden, name.patch) != (depth, hidden, ph):
            raise CheckpointError(
                f"{path} does not match {model_name or name.key}: it has depth {depth}, width {hidden}, patch {ph}"
            )
    elif num_heads or hidden in _HEADS_BY_WIDTH:
        heads = num_heads or _HEADS_BY_WIDTH[hidden]
    else:
        raise CheckpointError(f"{path}: cannot tell the number of heads of width {hidden}; give num_heads or a model name")
    if hidden % heads:
        raise CheckpointError(f"{path}: width {hidden} is not divisible by {heads} heads")
    return PPFlowConfig(
        input_size=(side * ph, side * pw), in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=num_classes,
        base_patch=PatchShape(ph, pw), prediction=name.prediction if name else "velocity",
    )


def _official_to_ppflow(state, config: PPFlowConfig, path) -> dict[str, torch.Tensor]:
    """Rename the official per-model layers into the base patch level; drop the learned-sigma
    half of the head (the flow uses the first in_channels outputs)."""
    level = f"levels.{config.base_patch}"
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if key.startswith(("x_embedder.", "final_layer.")):
            key = f"{level}.{key}"
        out[key] = value
    c, area = config.in_channels, config.base_patch.area
    weight = _require(state, "final_layer.linear.weight", path)
    out_channels = weight.shape[0] // area
    if out_channels not in (c, 2 * c) or weight.shape[0] % area:
        raise CheckpointError(f"{path}: head has {weight.shape[0]} outputs, expected {area * c} or {2 * area * c}")
    keep = (torch.arange(area).view(-1, 1) * out_channels + torch.arange(c)).reshape(-1)
    out[f"{level}.final_layer.linear.weight"] = weight[keep]
    out[f"{level}.final_layer.linear.bias"] = state["final_layer.linear.bias"][keep]
    out[f"{level}.level_embed"] = torch.zeros(config.hidden_size)
    return out


def load_base(path: str | Path, model_name: str | None = None, num_heads: int | None = None) -> PPFlowDiT:
    """A PPFlow model from an official DiT/SiT checkpoint or a ppsearch checkpoint.

    ``model_name`` (e.g. ``"SiT-XL/2"`` or ``"DiT-XL/2"``) names the size and what the network
    predicts (SiT: the flow velocity; DiT: the noise on its VP schedule); without it both are
    read from the file name when it is an official one, else the width gives the heads
    (``num_heads`` for unofficial widths) and a velocity model is assumed.
    """
    state, metadata = read_state_dict(path)
    if "config" in metadata:
        config = config_from_dict(json.loads(metadata["config"]))
    else:
        config = _infer_config(state, path, model_name, num_heads)
        state = _official_to_ppflow(state, config, path)
    with torch.device("meta"):
        model = PPFlowDiT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the model it describes: {str(err).splitlines()[1].strip()}") from None
    return model.float()


def config_from_dict(data: dict) -> PPFlowConfig:
    data = dict(data)
    if "time_input" in data:  # files written before the prediction field: "flow" or "ddpm"
        data["prediction"] = {"flow": "velocity", "ddpm": "epsilon"}[data.pop("time_input")]
    data["base_patch"] = PatchShape.parse(data["base_patch"])
    data["patch_shapes"] = tuple(PatchShape.parse(p) for p in data.get("patch_shapes", ()))
    data["input_size"] = tuple(data["input_size"])
    return PPFlowConfig(**data)


def save_model(model: PPFlowDiT, path: str | Path, extra_metadata: dict | None = None) -> None:
    """Write ``model`` as safetensors with its config in the metadata."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(model.config.to_dict()), **(extra_metadata or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
