import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ppsearch.cli import main
from ppsearch.flops import forward_macs, relative_cost, sample_cost, train_step_macs
from ppsearch.flow import SolverConfig
from ppsearch.models import PPFlow_models, PPFlowConfig, PPFlowDiT, ppflow_variant
from ppsearch.schedule import Schedule

from conftest import tiny_config

_cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@register_flop_formula(_cpu_sdpa, get_raw=True)
def _cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs):
    """The counter knows the CUDA attention ops only; CPU SDPA costs the same."""
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def counted_flops(model, patch, batch=2):
    c = model.config
    x = torch.randn(batch, c.in_channels, *c.input_size)
    t, y = torch.rand(batch), torch.zeros(batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y, patch)
    return counter.get_total_flops() / batch


def test_dit_xl_2_is_118_6_gmacs():
    config = PPFlowConfig()  # DiT-XL/2 at 256x256: 32x32x4 latents
    assert forward_macs(config, "2x2") / 1e9 == pytest.approx(118.6, abs=0.05)


def test_ppf_xl_3_is_about_half_of_the_base():
    config = PPFlowConfig()
    ratio = relative_cost(config, Schedule.parse("4x4@0.5,2x4@0.75,2x2"), SolverConfig(steps=100))
    assert 0.494 <= ratio <= 0.4955
    ratio2 = relative_cost(config, Schedule.parse("4x4@0.5,2x2"), SolverConfig(steps=100))
    assert ratio2 == pytest.approx(0.622, abs=0.002)


@pytest.mark.parametrize("patch", ["2x2", "4x4", "2x4", "8x8"])
def test_formula_matches_flop_counter_on_a_real_model(patch):
    torch.manual_seed(0)
    model = ppflow_variant(PPFlow_models["S/2"](input_size=32, num_classes=10), ["4x4", "2x4", "8x8"]).eval()
    counted = counted_flops(model, patch)
    assert 2 * forward_macs(model.config, patch) == pytest.approx(counted, rel=0.005)


def test_formula_matches_flop_counter_non_square_latent():
    model = ppflow_variant(PPFlowDiT(tiny_config(input_size=(16, 8))), ["4x4"]).eval()
    for patch in ("2x2", "4x4"):
        assert 2 * forward_macs(model.config, patch) == pytest.approx(counted_flops(model, patch), rel=0.005)


def test_guidance_doubles_forwards_only_where_scale_is_not_one():
    config = PPFlowConfig()
    schedule = Schedule.parse("4x4@0.5:cfg1.0,2x2:cfg1.5")
    cost = sample_cost(config, schedule, SolverConfig(steps=10, solver="heun"))
    assert [s.forwards for s in cost.stages] == [10, 20]  # 5 Heun steps = 10 evals, x2 for guidance
    assert cost.macs == 10 * forward_macs(config, "4x4") + 20 * forward_macs(config, "2x2")
    assert cost.gflops == pytest.approx(2 * cost.gmacs)
    assert sample_cost(config, schedule, SolverConfig(steps=10), decode_macs=7).macs == 5 * forward_macs(
        config, "4x4") + 10 * forward_macs(config, "2x2") + 7


def test_train_step_weights_stages_by_length():
    config = PPFlowConfig()
    macs = train_step_macs(config, Schedule.parse("4x4@0.25,2x2"), batch=8)
    assert macs == pytest.approx(3 * 8 * (0.25 * forward_macs(config, "4x4") + 0.75 * forward_macs(config, "2x2")))


def test_flops_cli_json(capsys):
    main(["flops", "--model", "XL/2", "--schedule", "4x4@0.5,2x4@0.75,2x2", "--steps", "100", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [s["patch"] for s in report["stages"]] == ["4x4", "2x4", "2x2"]
    assert [s["steps"] for s in report["stages"]] == [50, 25, 25]
    assert report["stages"][2]["gmacs_per_forward"] == pytest.approx(118.6, abs=0.05)
    assert report["relative_to_base"] == pytest.approx(0.495, abs=0.001)
    assert report["gflops"] == pytest.approx(2 * report["gmacs"])


def test_flops_cli_table(capsys):
    main(["flops", "--model", "XL/2", "--schedule", "4x4@0.5,2x2"])
    out = capsys.readouterr().out
    assert "62.2% of the base schedule 2x2" in out and "GFLOPs" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "XL/2", "--schedule", "2x2@0.5,4x4"], "must not grow"),
    (["--model", "XXL/2", "--schedule", "2x2"], "unknown model"),
    (["--model", "XL/2", "--schedule", "3x3@0.5,2x2"], "does not divide"),
    (["--model", "/nonexistent/ckpt.pt", "--schedule", "2x2"], "checkpoint not found"),
])
def test_flops_cli_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
