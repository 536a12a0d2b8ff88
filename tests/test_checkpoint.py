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


def test_import_without_learned_sigma_and_time_convention(tmp_path):
    official = _official(learn_sigma=False)
    torch.save(official.state_dict(), tmp_path / "SiT-tiny.pt")
    model = load_base(tmp_path / "SiT-tiny.pt", num_heads=4).eval()
    x, t, y = _inputs()
    torch.testing.assert_close(model(x, t, y), official(x, t, y), rtol=1e-5, atol=1e-5)
    assert model.config.time_input == "flow"
    assert torch.equal(model.timestep_input(torch.tensor([0.25])), torch.tensor([0.25]))


def test_dit_name_sets_ddpm_time_input(tmp_path):
    torch.save(_official(hidden_size=384, num_heads=6).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not match DiT-S/2"):
        load_base(tmp_path / "w.pt", model_name="DiT-S/2")  # S has depth 12, this file 2
    model = load_base(tmp_path / "w.pt")
    assert model.config.num_heads == 6 and model.config.time_input == "flow"
    torch.save(_official(hidden_size=384, num_heads=6, depth=12).state_dict(), tmp_path / "DiT-S-2-256x256.pt")
    dit = load_base(tmp_path / "DiT-S-2-256x256.pt")
    assert dit.config.time_input == "ddpm"
    assert dit.timestep_input(torch.tensor([0.0, 1.0])).tolist() == [999.0, 0.0]


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
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
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
