"""An independent re-implementation of the official DiT/SiT network (facebookresearch/DiT,
willisma/SiT models.py), with the official parameter names, to check checkpoint import.

Attention is written out (softmax(q k^T / sqrt(d)) v) rather than through SDPA, and the
position embedding is a stored parameter, as in the official checkpoints.
"""
import math

import numpy as np
import torch
import torch.nn as nn


def sincos_2d(dim, side):
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 4 * d)
        self.mlp.fc2 = nn.Linear(4 * d, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        B, N, D = x.shape
        norm = lambda v: nn.functional.layer_norm(v, (D,), eps=1e-6)
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = norm(x) * (1 + sc1[:, None]) + s1[:, None]
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1) @ v
        x = x + g1[:, None] * self.attn.proj(a.transpose(1, 2).reshape(B, N, D))
        h = norm(x) * (1 + sc2[:, None]) + s2[:, None]
        return x + g2[:, None] * self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(h), approximate="tanh"))


class OfficialDiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                 num_classes=10, learn_sigma=True):
        super().__init__()
        self.p, self.c = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        side = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(hidden_size, side)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for p in self.parameters():  # random, non-zero everywhere: every path matters
            if p.requires_grad:
                nn.init.normal_(p, std=0.05)

    def forward(self, x, t, y):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        c = c + self.y_embedder.embedding_table(y)
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = nn.functional.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = self.final_layer.linear(h)
        n, side, p = x.shape[0], int(h.shape[1] ** 0.5), self.p
        h = h.reshape(n, side, side, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(n, self.out_channels, side * p, side * p)
