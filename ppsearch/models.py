"""PPFlow diffusion transformer.

DiT blocks shared by every stage; per patch shape a patch embedding, a fixed sin-cos
position embedding for its token grid, an unpatchify head and a learned level embedding
added to the conditioning. Layer names follow facebookresearch/DiT's models.py so that
official DiT and SiT checkpoints load into the base patch shape unchanged.
"""
from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlashAttention over variable-length sequences (CUDA, half precision; PyTorch >= 2.9)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

from .errors import PPSearchError
from .schedule import PatchShape, ScheduleError


PREDICTIONS = ("velocity", "epsilon")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


@dataclass(frozen=True)
class PPFlowConfig:
    """Sizes of a PPFlow model; enough to rebuild it or count its FLOPs."""

    input_size: tuple[int, int] = (32, 32)
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    base_patch: PatchShape = PatchShape(2, 2)
    # What the network predicts: "velocity" of the flow at flow time t (SiT, ppsearch's own
    # models) or "epsilon", the noise, at a step of DiT's discrete VP schedule. The sampler and
    # the loss see both through ppsearch.flow.velocity.
    prediction: str = "velocity"
    patch_shapes: tuple[PatchShape, ...] = field(default=())

    def __post_init__(self):
        size = self.input_size
        object.__setattr__(self, "input_size", (size, size) if isinstance(size, int) else tuple(size))
        object.__setattr__(self, "base_patch", PatchShape.parse(self.base_patch))
        shapes = tuple(PatchShape.parse(p) for p in self.patch_shapes) or (self.base_patch,)
        object.__setattr__(self, "patch_shapes", tuple(dict.fromkeys((self.base_patch, *shapes))))
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def num_tokens(self, patch: PatchShape) -> int:
        return (self.input_size[0] // patch.h) * (self.input_size[1] // patch.w)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["base_patch"] = str(self.base_patch)
        data["patch_shapes"] = [str(p) for p in self.patch_shapes]
        return data


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of (possibly fractional) timesteps, as in DiT."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Embeds class labels; label ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


#################################################################################
#                                 Core PPFlow Model                             #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        """``attn_mask``: None, a boolean mask for SDPA, or :class:`Segments` of a flat token
        stream ``x`` of shape (1, T, C), attended within each segment."""
        B, N, C = x.shape
        if isinstance(attn_mask, Segments):
            q, k, v = self.qkv(x).view(N, 3, self.num_heads, C // self.num_heads).unbind(1)
            cu, longest = attn_mask.cu_seqlens, attn_mask.max_len
            return self.proj(varlen_attn(q, k, v, cu, cu, longest, longest).reshape(B, N, C))
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _per_token(modulation, token_sample):
    """Modulation of shape (B, K) -> (B, 1, K), or gathered per token when packed."""
    return modulation.unsqueeze(1) if token_sample is None else modulation[token_sample]


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, attn_mask=None, token_sample=None):
        modulation = _per_token(self.adaLN_modulation(c), token_sample)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PatchEmbed(nn.Module):
    """Latent (N, C, H, W) -> tokens (N, H/ph * W/pw, D), row-major over the token grid."""

    def __init__(self, patch: PatchShape, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=(patch.h, patch.w),
                              stride=(patch.h, patch.w), bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map of each token to its patch."""

    def __init__(self, hidden_size, patch: PatchShape, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch.h * patch.w * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchLevel(nn.Module):
    """Everything that belongs to one patch shape: embedding, position, head, level embedding."""

    def __init__(self, patch: PatchShape, config: PPFlowConfig):
        super().__init__()
        self.patch = patch
        self.grid = (config.input_size[0] // patch.h, config.input_size[1] // patch.w)
        self.x_embedder = PatchEmbed(patch, config.in_channels, config.hidden_size)
        self.final_layer = FinalLayer(config.hidden_size, patch, config.in_channels)
        self.level_embed = nn.Parameter(torch.zeros(config.hidden_size))
        pos = get_2d_sincos_pos_embed(config.hidden_size, *level_positions(patch, config.base_patch, self.grid))
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)

    def embed(self, x):
        return self.x_embedder(x) + self.pos_embed

    def unpatchify(self, x):
        """Tokens (N, T, ph * pw * C) -> latent (N, C, H, W)."""
        (gh, gw), p = self.grid, self.patch
        c = x.shape[-1] // (p.h * p.w)
        x = x.reshape(x.shape[0], gh, gw, p.h, p.w, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p.h, gw * p.w)

    @torch.no_grad()
    def initialise_from(self, base: PatchLevel):
        """PPFlow's initialisation from the base patch shape.

        The embedding of an (a*bh) x (b*bw) patch equals the base embedding applied to the
        (a, b) average-pooled patch; the head repeats the base prediction over the a x b
        sub-patches (nearest upsampling).
        """
        a, b = self.patch.h // base.patch.h, self.patch.w // base.patch.w
        weight = base.x_embedder.proj.weight.repeat_interleave(a, dim=2).repeat_interleave(b, dim=3)
        self.x_embedder.proj.weight.copy_(weight / (a * b))
        self.x_embedder.proj.bias.copy_(base.x_embedder.proj.bias)
        self.final_layer.adaLN_modulation.load_state_dict(base.final_layer.adaLN_modulation.state_dict())
        rows = _upsampled_rows(base.patch, self.patch, self.final_layer.linear.out_features // self.patch.area)
        self.final_layer.linear.weight.copy_(base.final_layer.linear.weight[rows])
        self.final_layer.linear.bias.copy_(base.final_layer.linear.bias[rows])
        self.level_embed.copy_(base.level_embed)


def _upsampled_rows(base: PatchShape, patch: PatchShape, channels: int) -> torch.Tensor:
    """For each output (i, j, c) of a ``patch`` head, the row of the base head it repeats."""
    a, b = patch.h // base.h, patch.w // base.w
    i = torch.arange(patch.h).view(-1, 1, 1) // a
    j = torch.arange(patch.w).view(1, -1, 1) // b
    c = torch.arange(channels).view(1, 1, -1)
    return ((i * base.w + j) * channels + c).reshape(-1)


class PPFlowDiT(nn.Module):
    """Diffusion transformer whose stages share blocks and differ in patch shape."""

    def __init__(self, config: PPFlowConfig):
        super().__init__()
        self.config = config
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        self.blocks = nn.ModuleList([
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_hidden) for _ in range(config.depth)
        ])
        self.levels = nn.ModuleDict({str(p): PatchLevel(p, config) for p in config.patch_shapes})
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for level in self.levels.values():
            w = level.x_embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(level.x_embedder.proj.bias, 0)
            for layer in (level.final_layer.adaLN_modulation[-1], level.final_layer.linear):
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)

    # -- patch shapes --------------------------------------------------------------
    @property
    def patch_shapes(self) -> list[PatchShape]:
        return list(self.config.patch_shapes)

    def level(self, patch) -> PatchLevel:
        patch = PatchShape.parse(patch)
        if str(patch) not in self.levels:
            raise ScheduleError(f"the model has no patch shape {patch} (it has {', '.join(self.levels)})")
        return self.levels[str(patch)]

    def add_patch_shapes(self, patches):
        """Add levels for new patch shapes, initialised from the base patch as PPFlow does."""
        base = self.level(self.config.base_patch)
        new = [p for p in map(PatchShape.parse, patches) if str(p) not in self.levels]
        for patch in new:
            self._check_patch(patch)
            level = PatchLevel(patch, self.config).to(base.level_embed.device, base.level_embed.dtype)
            level.initialise_from(base)
            self.levels[str(patch)] = level
        self.config = replace(self.config, patch_shapes=(*self.config.patch_shapes, *new))
        return self

    def keep_patch_shapes(self, patches):
        """Drop the levels of shapes not in ``patches`` (the base patch's always stays)."""
        keep = {str(p) for p in map(PatchShape.parse, patches)} | {str(self.config.base_patch)}
        for name in [name for name in self.levels if name not in keep]:
            del self.levels[name]
        self.config = replace(self.config, patch_shapes=tuple(p for p in self.config.patch_shapes if str(p) in keep))
        return self

    def _check_patch(self, patch: PatchShape):
        (h, w), base = self.config.input_size, self.config.base_patch
        if h % patch.h or w % patch.w:
            raise ScheduleError(f"patch {patch} does not divide the {h}x{w} latent")
        if patch.h % base.h or patch.w % base.w:
            raise ScheduleError(f"patch {patch} cannot be initialised from the base patch {base}")

    # -- forward -------------------------------------------------------------------
    def forward(self, x, t, y, patches=None, packed=False):
        """
        Forward pass.
        x: (N, C, H, W) latents; t: (N,) what the timestep embedder takes (flow time for a
        velocity model, the VP step for an epsilon one: call ``ppsearch.flow.velocity``);
        y: (N,) class labels; patches: one patch shape for the batch, or one per sample
        (default: the base patch); packed: run samples of different patch shapes in one pass
        instead of one pass per shape: one stream of all their tokens with variable-length
        attention (CUDA, half precision), else rows with a block-diagonal attention mask.
        """
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        groups = self._groups(patches, x.shape[0], x.device)
        if not packed or len(groups) == 1:
            return self._forward_grouped(x, c, groups)
        return self._forward_packed(x, c, groups)

    def _groups(self, patches, batch, device):
        """[(level, sample indices or None for all)] for the batch's patch shapes."""
        if patches is None or isinstance(patches, (str, PatchShape)) or (
                isinstance(patches, (tuple, list)) and len(patches) == 2 and isinstance(patches[0], int)):
            return [(self.level(patches or self.config.base_patch), None)]
        if len(patches) != batch:
            raise ValueError(f"got {len(patches)} patch shapes for a batch of {batch}")
        names = [str(PatchShape.parse(p)) for p in patches]
        groups = []
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            groups.append((self.level(name), None if len(index) == batch else index))
        return groups

    def _run_blocks(self, x, c, attn_mask=None, token_sample=None):
        for block in self.blocks:
            x = block(x, c, attn_mask, token_sample)
        return x

    def _forward_grouped(self, x, c, groups):
        out = None
        for level, index in groups:
            xs, cs = (x, c) if index is None else (x[index], c[index])
            cs = cs + level.level_embed
            h = self._run_blocks(level.embed(xs), cs)
            ys = level.unpatchify(level.final_layer(h, cs))
            if index is None:
                return ys
            out = ys.new_empty((x.shape[0], *ys.shape[1:])) if out is None else out
            out[index] = ys
        return out

    def _forward_packed(self, x, c, groups):
        tokens, conds, lengths = [], [], []
        for level, index in groups:
            cs = c[index] + level.level_embed
            h = level.embed(x[index])
            tokens.append(h.reshape(-1, h.shape[-1]))
            conds.append(cs)
            lengths += [h.shape[1]] * h.shape[0]
        conds = torch.cat(conds)
        flat = torch.cat(tokens)
        if _has_varlen_attention(flat, self.config.hidden_size // self.config.num_heads):
            # one stream of all the tokens: no padding, no mask
            segments = Segments.of(lengths, flat.device)
            token_sample = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device),
                                                   torch.tensor(lengths, device=flat.device))
            flat = self._run_blocks(flat[None], conds, segments, token_sample[None])[0]
        else:  # rows of the longest sequence's length, attention masked block-diagonally
            packing = pack_sequences(lengths, device=x.device)
            rows = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])[packing.gather]
            rows = self._run_blocks(rows, conds, packing.attn_mask, packing.token_sample)
            flat = rows.reshape(-1, rows.shape[-1])[packing.scatter]
        out, start = None, 0
        for (level, index), cs in zip(groups, conds.split([len(i) for _, i in groups])):
            n, count = len(index), len(index) * level.grid[0] * level.grid[1]
            h = flat[start:start + count].view(n, -1, flat.shape[-1])
            ys = level.unpatchify(level.final_layer(h, cs))
            out = ys.new_empty((x.shape[0], *ys.shape[1:])) if out is None else out
            out[index] = ys
            start += count
        return out


def _has_varlen_attention(tokens: torch.Tensor, head_dim: int) -> bool:
    """Whether the packed path can use the variable-length FlashAttention kernel: a PyTorch that
    has it, CUDA tokens in half precision (or under half-precision autocast), a head size
    FlashAttention takes."""
    half = (torch.float16, torch.bfloat16)
    return varlen_attn is not None and tokens.is_cuda and head_dim % 8 == 0 and head_dim <= 256 and (
        tokens.dtype in half or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half))


@dataclass
class Segments:
    """Consecutive sequences of one flat token stream: sequence j holds tokens
    cu_seqlens[j]:cu_seqlens[j + 1]."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32
    max_len: int

    @classmethod
    def of(cls, lengths, device=None) -> Segments:
        offsets = list(itertools.accumulate(lengths, initial=0))
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device), max(lengths))


@dataclass
class Packing:
    """Where each token of a list of sequences sits in rows of a shared length."""

    gather: torch.Tensor        # (R, L): flat token index, or len(flat) for padding
    scatter: torch.Tensor       # (T,): position of each flat token in the (R * L) rows
    token_sample: torch.Tensor  # (R, L): sequence each position belongs to (0 for padding)
    attn_mask: torch.Tensor     # (R, 1, L, L): True where attention is allowed


def pack_sequences(lengths, capacity=None, device=None) -> Packing:
    """First-fit-decreasing packing of sequences into rows; attention stays inside each one.

    Padding positions form their own segment per row, so no softmax row is empty.
    """
    capacity = capacity or max(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, free = [], []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    offsets = list(itertools.accumulate(lengths, initial=0))
    total = offsets[-1]
    gather = torch.full((len(rows), capacity), total, dtype=torch.long)
    segment = torch.empty((len(rows), capacity), dtype=torch.long)
    token_sample = torch.zeros((len(rows), capacity), dtype=torch.long)
    scatter = torch.empty(total, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        segment[r] = len(lengths) + r
        for i in members:
            span = slice(pos, pos + lengths[i])
            gather[r, span] = torch.arange(offsets[i], offsets[i + 1])
            segment[r, span] = i
            token_sample[r, span] = i
            scatter[offsets[i]:offsets[i + 1]] = torch.arange(r * capacity + pos, r * capacity + pos + lengths[i])
            pos += lengths[i]
    mask = (segment[:, :, None] == segment[:, None, :]).unsqueeze(1)
    return Packing(gather.to(device), scatter.to(device), token_sample.to(device), mask.to(device))


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def level_positions(patch: PatchShape, base_patch: PatchShape, grid: tuple[int, int]):
    """Coordinates (rows, cols) on the base model's token grid of a level's token rows and columns.

    Token (i, j) of an (a * bh) x (b * bw) patch covers the base tokens (i * a ... i * a + a - 1,
    j * b ... j * b + b - 1) and sits at their centre, (i * a + (a - 1) / 2, j * b + (b - 1) / 2):
    PPFlow initialises its embedding as the base's on the average-pooled input, whose content is
    centred there. The official code puts it at the corner (i * a, j * b); on the embedded base the
    centre starts closer to the data (velocity MSE of PPF-3's 4x4 / 2x4 stages at initialisation
    1.00 / 0.84 against 1.09 / 0.89) and ends better after the toy fine-tune (FID 65.9 / 106.9 for
    PPF-2 / PPF-3 against 71.3 / 111.7): bench/positions.py. The base level is the base grid itself.
    """
    import numpy as np

    a, b = patch.h / base_patch.h, patch.w / base_patch.w
    return np.arange(grid[0]) * a + (a - 1) / 2, np.arange(grid[1]) * b + (b - 1) / 2


def get_2d_sincos_pos_embed(embed_dim, rows, cols):
    """Fixed 2D sin-cos embedding of the grid of (row, col) coordinates, row-major, laid out
    as DiT's (first half encodes the column, second half the row)."""
    import numpy as np

    grid = np.meshgrid(np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64))
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0].reshape(-1))
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1].reshape(-1))
    return np.concatenate([emb_w, emb_h], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    import numpy as np

    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                  PPFlow Configs                               #
#################################################################################

# depth, width, heads: the official DiT / SiT sizes, and T for the embedded default's tiny
# base (16x16 digits), small enough to pretrain on a laptop CPU.
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (6, 96, 4)}


def _constructor(depth, hidden_size, num_heads, patch):
    def build(**kwargs):
        return PPFlowDiT(PPFlowConfig(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                      base_patch=PatchShape(patch, patch), **kwargs))
    return build


PPFlow_models = {
    f"{size}/{patch}": _constructor(*SIZES[size], patch)
    for size in ("XL", "L", "B", "S") for patch in (2, 4, 8)
}
PPFlow_models["T/2"] = _constructor(*SIZES["T"], 2)

_NAME = r"(?P<size>XL|L|B|S|T)[-/](?P<patch>\d+)(?:-(?P<image>\d+)x(?P=image))?"


@dataclass(frozen=True)
class ModelName:
    """A model size as users name it: a size-table key (``XL/2``), an official name (``SiT-XL/2``,
    ``DiT-XL/2``) or an official checkpoint file name (``DiT-XL-2-512x512.pt``). The family says
    what the network predicts; an image size in the name gives the latent side (VAE factor 8)."""

    size: str
    patch: int
    family: str | None = None  # "DiT", "SiT", or None for ppsearch's own (velocity) models
    image_size: int | None = None

    @property
    def key(self) -> str:
        return f"{self.size}/{self.patch}"

    @property
    def prediction(self) -> str:
        return "epsilon" if self.family == "DiT" else "velocity"

    @property
    def input_size(self) -> int | None:
        return self.image_size // 8 if self.image_size else None


def parse_model_name(text: str, anywhere: bool = False) -> ModelName | None:
    """The model a name (or a checkpoint file's name) gives, or None. ``anywhere``: find an
    official ``DiT-``/``SiT-`` name inside a longer file name."""
    name = str(text)
    if re.search(r"\.(pt|pth|safetensors)$", name):  # a checkpoint file: its name without the folder
        name = re.sub(r"\.(pt|pth|safetensors)$", "", re.split(r"[/\\]", name)[-1])
    family = r"(?P<family>DiT|SiT)-"
    match = (re.search(family + _NAME, name, re.IGNORECASE) if anywhere
             else re.fullmatch(f"(?:{family})?{_NAME}", name, re.IGNORECASE))
    if not match or f"{match['size'].upper()}/{match['patch']}" not in PPFlow_models:
        return None
    family = match["family"] and {"dit": "DiT", "sit": "SiT"}[match["family"].lower()]
    return ModelName(match["size"].upper(), int(match["patch"]), family,
                     int(match["image"]) if match["image"] else None)


def build_named(text: str, **kwargs) -> PPFlowDiT:
    """A model (random weights) of the size ``text`` names; ``kwargs`` go to PPFlowConfig."""
    name = parse_model_name(text)
    if name is None:
        raise PPSearchError(f"unknown model {text!r}: a size ({', '.join(PPFlow_models)}), an official name "
                         f"(SiT-XL/2, DiT-XL/2) or an official checkpoint file name (DiT-XL-2-256x256.pt)")
    defaults = {"prediction": name.prediction, "input_size": name.input_size}
    return PPFlow_models[name.key](**{**{k: v for k, v in defaults.items() if v is not None}, **kwargs})


def ppflow_variant(base: PPFlowDiT, patches) -> PPFlowDiT:
    """A copy of ``base`` with levels for ``patches``, initialised the PPFlow way."""
    return copy.deepcopy(base).add_patch_shapes(patches)
