import copy

import pytest
import torch
import torch.nn.functional as F

from ppsearch import models
from ppsearch.models import PPFlow_models, PPFlowDiT, pack_sequences, ppflow_variant
from ppsearch.schedule import PatchShape, ScheduleError

from conftest import randomized, tiny_config
from reference_dit import sincos_2d


def _inputs(n, config, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, config.in_channels, *config.input_size), generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, config.num_classes, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("patch", ["4x4", "2x4", "4x2", "8x8", "8x4"])
def test_new_embedding_is_base_embedding_of_pooled_input(tiny_model, patch):
    variant = ppflow_variant(tiny_model, [patch])
    base, new = variant.level("2x2"), variant.level(patch)
    p = PatchShape.parse(patch)
    x, _, _ = _inputs(3, variant.config)
    pooled = F.avg_pool2d(x, (p.h // 2, p.w // 2))
    torch.testing.assert_close(new.x_embedder(x), base.x_embedder(pooled), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch", ["4x4", "2x4", "4x2", "8x8"])
def test_new_head_is_base_head_upsampled(tiny_model, patch):
    variant = ppflow_variant(tiny_model, [patch])
    base, new = variant.level("2x2"), variant.level(patch)
    p = PatchShape.parse(patch)
    a, b = p.h // 2, p.w // 2
    tokens = new.grid[0] * new.grid[1]
    h, c = torch.randn(2, tokens, 48), torch.randn(2, 48)
    base_small = copy.deepcopy(base)
    base_small.grid = new.grid  # the base head on the pooled input has the coarse grid
    expected = base_small.unpatchify(base.final_layer(h, c)).repeat_interleave(a, 2).repeat_interleave(b, 3)
    torch.testing.assert_close(new.unpatchify(new.final_layer(h, c)), expected)


@pytest.mark.parametrize("patch", ["4x4", "2x4", "8x8"])
def test_variant_at_init_is_base_on_pooled_latent_upsampled(tiny_model, patch):
    """The whole network: a new patch shape starts as the pretrained model run on the
    average-pooled latent, its tokens at their base-grid positions, its prediction repeated
    (PPFlow's initialisation)."""
    variant = ppflow_variant(tiny_model, [patch])
    p = PatchShape.parse(patch)
    a, b = p.h // 2, p.w // 2
    small = PPFlowDiT(tiny_config(input_size=(16 // a, 16 // b))).eval()
    small.load_state_dict(tiny_model.state_dict())
    small.levels["2x2"].pos_embed = variant.level(patch).pos_embed  # tied to the base grid below
    x, t, y = _inputs(4, variant.config)
    expected = small(F.avg_pool2d(x, (a, b)), t, y).repeat_interleave(a, 2).repeat_interleave(b, 3)
    torch.testing.assert_close(variant(x, t, y, patch), expected, rtol=1e-4, atol=1e-5)


def _sincos(dim, rows, cols):
    """DiT's 2D sin-cos embedding at (row, col) coordinates: first half the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    def one(pos):
        return torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)
    return torch.cat([one(cols), one(rows)], dim=1)


@pytest.mark.parametrize("patch", ["2x2", "4x4", "2x4", "4x2", "8x8", "8x4", "16x16"])
def test_every_token_sits_at_the_centre_of_the_base_tokens_it_covers(tiny_model, patch):
    """Each token's position embedding is the base grid's at the mean base-token coordinate of
    the latent pixels it embeds (for a 4x4 token from a 2x2 base: base rows 2i and 2i + 1, so 2i + 0.5)."""
    variant = ppflow_variant(tiny_model, [patch])
    level, base = variant.level(patch), variant.config.base_patch
    height, width = variant.config.input_size
    pixel_rows = torch.arange(height, dtype=torch.float64)
    pixel_cols = torch.arange(width, dtype=torch.float64)
    # which token each pixel goes to, as the patch embedding (a strided convolution) lays them out
    token_row, token_col = pixel_rows // level.patch.h, pixel_cols // level.patch.w
    base_row, base_col = pixel_rows // base.h, pixel_cols // base.w
    rows = torch.stack([base_row[token_row == i].mean() for i in range(level.grid[0])])
    cols = torch.stack([base_col[token_col == j].mean() for j in range(level.grid[1])])
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    expected = _sincos(variant.config.hidden_size, grid_rows.reshape(-1), grid_cols.reshape(-1))
    torch.testing.assert_close(level.pos_embed[0].double(), expected, rtol=0, atol=1e-6)
    if patch == "2x2":  # the base level is DiT's own grid
        torch.testing.assert_close(level.pos_embed[0].double(),
                                   torch.from_numpy(sincos_2d(variant.config.hidden_size, 8)), rtol=0, atol=1e-6)


def test_variant_leaves_base_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    variant = ppflow_variant(tiny_model, ["4x4", "2x4"])
    assert set(tiny_model.levels) == {"2x2"} and set(variant.levels) == {"2x2", "4x4", "2x4"}
    assert variant.config.patch_shapes == (PatchShape(2, 2), PatchShape(4, 4), PatchShape(2, 4))
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])


def _mixed_model():
    torch.manual_seed(0)
    model = PPFlowDiT(tiny_config(patch_shapes=("2x2", "4x4", "2x4", "4x2", "8x8", "1x1"), base_patch="1x1"))
    return randomized(model).eval()


def _segment_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's contract in plain SDPA, one segment at a time (the kernel is CUDA-only)."""
    spans = list(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()))
    return torch.cat([F.scaled_dot_product_attention(*(z[a:b].transpose(0, 1) for z in (q, k, v))).transpose(0, 1)
                      for a, b in spans])


@pytest.fixture(params=["rows", "stream"])
def packed_layout(request, monkeypatch):
    """The packed path both ways: rows with a mask (CPU), and the one-stream layout of the CUDA
    variable-length kernel, here with that kernel's contract emulated."""
    if request.param == "stream":
        monkeypatch.setattr(models, "_has_varlen_attention", lambda tokens, head_dim: True)
        monkeypatch.setattr(models, "varlen_attn", _segment_attention)
    return request.param


def test_mixed_batch_grouped_and_packed_match_each_sample_alone(packed_layout):
    model = _mixed_model()
    shapes = ["4x4", "2x2", "2x4", "8x8", "4x4", "2x2", "4x2", "1x1", "2x4"]
    x, t, y = _inputs(len(shapes), model.config)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1], s) for i, s in enumerate(shapes)])
    grouped = model(x, t, y, shapes)
    packed = model(x, t, y, shapes, packed=True)
    torch.testing.assert_close(grouped, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_packed_gradients_match_grouped(packed_layout):
    model = _mixed_model().train()
    model.y_embedder.dropout_prob = 0.0
    shapes = ["4x4", "2x2", "2x4", "8x8", "2x2"]
    x, t, y = _inputs(len(shapes), model.config)
    grads = []
    for packed in (False, True):
        model.zero_grad()
        model(x, t, y, shapes, packed=packed).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6, msg=name)


def test_packing_puts_short_sequences_together_and_masks_them_apart():
    packing = pack_sequences([4, 16, 4, 8, 4, 4])
    assert packing.gather.shape == (3, 16)  # first-fit decreasing: 16 | 8 + 4 + 4 | 4 + 4
    mask = packing.attn_mask[:, 0]
    owners = packing.token_sample
    real = packing.gather < 40
    for r in range(mask.shape[0]):
        for i in range(16):
            for j in range(16):
                if real[r, i] and real[r, j]:
                    assert bool(mask[r, i, j]) == bool(owners[r, i] == owners[r, j])
                elif real[r, i] != real[r, j]:
                    assert not mask[r, i, j]
    assert mask.any(-1).all()  # no empty softmax row, padding included
    flat = torch.arange(40)
    rows = torch.cat([flat, flat.new_tensor([40])])[packing.gather]
    assert torch.equal(rows.reshape(-1)[packing.scatter], flat)


def test_unknown_patch_and_bad_shapes_are_clear_errors(tiny_model):
    x, t, y = _inputs(2, tiny_model.config)
    with pytest.raises(ScheduleError, match="has no patch shape 4x4"):
        tiny_model(x, t, y, "4x4")
    with pytest.raises(ScheduleError, match="does not divide the 16x16 latent"):
        ppflow_variant(tiny_model, ["2x6"])
    with pytest.raises(ScheduleError, match="cannot be initialised from the base patch 2x2"):
        ppflow_variant(tiny_model, ["1x1"])
    with pytest.raises(ValueError, match="3 patch shapes for a batch of 2"):
        tiny_model(x, t, y, ["2x2"] * 3)


def test_model_table_sizes():
    with torch.device("meta"):
        xl = PPFlow_models["XL/2"]()
        s4 = PPFlow_models["S/4"]()
    assert (xl.config.depth, xl.config.hidden_size, xl.config.num_heads) == (28, 1152, 16)
    assert sum(p.numel() for p in xl.parameters() if p.requires_grad) / 1e6 == pytest.approx(675.1, abs=1.0)
    assert s4.config.base_patch == PatchShape(4, 4)


def test_training_mode_drops_labels_for_guidance(tiny_model):
    tiny_model.train()
    tiny_model.y_embedder.dropout_prob = 1.0
    x, t, y = _inputs(2, tiny_model.config)
    null = torch.full_like(y, tiny_model.config.num_classes)
    torch.testing.assert_close(tiny_model(x, t, y), tiny_model.eval()(x, t, null))
