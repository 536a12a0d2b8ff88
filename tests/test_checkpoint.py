import argparse
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from ppsearch.checkpoint import CheckpointError, load_base, save_model
from ppsearch.cli import main
from ppsearch.models import ppflow_variant
from ppsearch.schedule import PatchShape

from reference_dit import OfficialDiT


def _official(learn_sigma=True, **kwargs):
    torch.manual_seed(0)
    return OfficialDiT(learn_sigma=learn_sigma, **kwargs).eval()


def _inputs(n=3, size=8, channels=4, timesteps=1.0):
    g = torch.Generator().manual_seed(3)
    return (torch.randn((n, channels, size, size), generator=g), torch.rand(n, generator=g) * timesteps,
            torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("wrapper, suffix, name", [
    (None, ".pt", "tiny.pt"),  # plain state dict (DiT's released checkpoints)
    ("ema", ".pt", "SiT-model.pt"),  # training checkpoints hold model / ema / opt
    ("model", ".pt", "ckpt.pt"),
    (None, ".safetensors", "model.safetensors"),
])
def test_import_reproduces_the_official_network(tmp_path, wrapper, suffix, name):
    official = _official()
    state = official.state_dict()
    path = tmp_path / name
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state if wrapper is None else {wrapper: state, "opt": {"lr": torch.tensor(1e-4)}}, path)
    model = load_base(path, num_heads=4).eval()
    assert model.config.base_patch == PatchShape(2, 2) and model.config.depth == 2
    assert model.config.input_size == (8, 8) and model.config.num_classes == 10
    x, t, y = _inputs(timesteps=999)
    with torch.no_grad():
        expected = official(x, t, y)[:, :4]  # the learned-sigma half is dropped
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_import_without_learned_sigma_and_prediction(tmp_path):
    official = _official(learn_sigma=False)
    torch.save(official.state_dict(), tmp_path / "SiT-tiny.pt")
    model = load_base(tmp_path / "SiT-tiny.pt", num_heads=4).eval()
    x, t, y = _inputs()
    torch.testing.assert_close(model(x, t, y), official(x, t, y), rtol=1e-5, atol=1e-5)
    assert model.config.prediction == "velocity"


def test_dit_name_makes_an_epsilon_model(tmp_path):
    torch.save(_official(hidden_size=384, num_heads=6).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not match DiT-S/2"):
        load_base(tmp_path / "w.pt", model_name="DiT-S/2")  # S has depth 12, this file 2
    with pytest.raises(CheckpointError, match="unknown model name 'DiT-Q/2'"):
        load_base(tmp_path / "w.pt", model_name="DiT-Q/2")
    model = load_base(tmp_path / "w.pt")
    assert model.config.num_heads == 6 and model.config.prediction == "velocity"
    torch.save(_official(hidden_size=384, num_heads=6, depth=12).state_dict(), tmp_path / "DiT-S-2-256x256.pt")
    assert load_base(tmp_path / "DiT-S-2-256x256.pt").config.prediction == "epsilon"
    assert load_base(tmp_path / "DiT-S-2-256x256.pt", model_name="SiT-S/2").config.prediction == "velocity"


def test_official_training_checkpoint_loads_its_ema(tmp_path):
    """DiT's and SiT's train.py save {"model", "ema", "opt", "args"} with args an argparse
    Namespace: read with weights_only and exactly that global allowed; the EMA weights win."""
    model, ema = _official(), _official()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(*_inputs(size=8)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256, results_dir="results",
                              vae="ema", ckpt=None, epochs=1400)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args},
               tmp_path / "0400000.pt")
    loaded = load_base(tmp_path / "0400000.pt", num_heads=4).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ema(x, t, y)[:, :4], rtol=1e-5, atol=1e-5)


def test_a_pickle_needing_any_other_global_is_refused_in_one_line(tmp_path):
    torch.save({"ema": _official().state_dict(), "args": argparse.Namespace(x=1), "extra": Fraction(1, 3)},
               tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"refused checkpoint .*needs fractions.Fraction") as err:
        load_base(tmp_path / "other.pt", num_heads=4)
    assert "\n" not in str(err.value)


def test_imported_base_initialises_variants(tmp_path):
    torch.save(_official().state_dict(), tmp_path / "base.pt")
    variant = ppflow_variant(load_base(tmp_path / "base.pt", num_heads=4), ["4x4"])
    x, t, y = _inputs()
    assert variant(x, t, y, "4x4").shape == x.shape


def test_ppsearch_checkpoint_round_trip(tmp_path, tiny_model):
    variant = ppflow_variant(tiny_model, ["4x4", "2x4"])
    save_model(variant, tmp_path / "v.safetensors")
    loaded = load_base(tmp_path / "v.safetensors").eval()
    assert loaded.config == variant.config
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.rand(2), torch.tensor([1, 2])
    for patch in ("2x2", "4x4", "2x4"):
        torch.testing.assert_close(loaded(x, t, y, patch), variant(x, t, y, patch))


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused checkpoint .*needs print"):
        load_base(tmp_path / "evil.pt")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot read checkpoint"),
    (lambda p: torch.save({"foo": torch.zeros(2)}, p), "missing tensor 'x_embedder.proj.weight'"),
    (lambda p: torch.save([1, 2, 3], p), "no state dict of tensors"),
    (lambda p: torch.save({k: v for k, v in _official().state_dict().items() if "blocks.1.mlp" not in k}, p),
     "does not fit"),
    (lambda p: torch.save({**_official().state_dict(), "final_layer.linear.weight": torch.zeros(20, 64)}, p),
     "head has 20 outputs"),
    (lambda p: torch.save({**_official().state_dict(), "pos_embed": torch.zeros(1, 15, 64)}, p),
     "not a square grid"),
])
def test_bad_files_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_base(path, num_heads=4)


def test_unknown_width_needs_heads(tmp_path):
    torch.save(_official().state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="cannot tell the number of heads of width 64"):
        load_base(tmp_path / "w.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_base(tmp_path / "nope.pt")


def test_cli_reads_checkpoint_sizes(tmp_path, capsys):
    torch.save(_official(hidden_size=384, num_heads=6).state_dict(), tmp_path / "base.pt")
    main(["flops", "--model", str(tmp_path / "base.pt"), "--schedule", "4x4@0.5,2x2", "--json"])
    assert '"relative_to_base"' in capsys.readouterr().out
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", "--model", str(tmp_path / "corrupt.pt"), "--schedule", "2x2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
