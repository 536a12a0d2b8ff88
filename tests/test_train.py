import pytest
import torch

from ppsearch.checkpoint import load_base
from ppsearch.cli import main
from ppsearch.config import ConfigError, load_trainer
from ppsearch.train import TrainError, build_model, train


def _tiny_trainer(tmp_path, *overrides):
    return load_trainer("pretrain_tiny", [
        "steps=6", "batch_size=8", "checkpoint_every=3", "progress=false", "log_every=0",
        f"out_dir={tmp_path / 'run'}", "model=T/2", *overrides])


def test_pretrain_recipe_composes_with_overrides(tmp_path):
    config = _tiny_trainer(tmp_path, "lr=0.01", "data.resolution=8")
    assert config.steps == 6 and config.lr == 0.01 and config.data.resolution == 8 and config.base is None


@pytest.mark.parametrize("overrides, message", [
    (["stepz=3"], "stepz"),
    (["steps=abc"], "steps"),
    (["data.nme=x"], "nme"),
    (["steps"], "bad override"),
])
def test_bad_overrides_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _tiny_trainer(tmp_path, *overrides)


def test_unknown_trainer_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown trainer 'nope'; available: .*pretrain_tiny"):
        load_trainer("nope")


def test_train_from_scratch_resumes_where_it_stopped(tmp_path):
    config = _tiny_trainer(tmp_path)
    result = train(config)
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.final_loss))
    model = load_base(result.checkpoint)
    assert model.config.in_channels == 1 and model.config.input_size == (16, 16)
    # Going on to 9 steps resumes from step 6 and runs only the 3 new ones.
    logs = []
    longer = _tiny_trainer(tmp_path, "steps=9")
    train(longer, log=logs.append)
    assert logs == [f"resuming from step 6 in {tmp_path / 'run'}"]


def test_fine_tune_adds_the_schedule_levels(tmp_path):
    train(_tiny_trainer(tmp_path))
    base = str(tmp_path / "run" / "model.safetensors")
    config = _tiny_trainer(tmp_path, f"base={base}", "schedule=4x4@0.5,2x4@0.75,2x2", f"out_dir={tmp_path / 'ft'}",
                           "packed=true")
    result = train(config)
    assert set(load_base(result.checkpoint).levels) == {"2x2", "4x4", "2x4"}


def test_base_and_data_must_agree(tmp_path):
    train(_tiny_trainer(tmp_path))
    config = _tiny_trainer(tmp_path, f"base={tmp_path / 'run' / 'model.safetensors'}", "data.resolution=8")
    with pytest.raises(TrainError, match="takes 1x16x16 latents"):
        build_model(config, (1, 8, 8), 10)


def test_cli_train_from_exported_file_and_errors(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text("schedule: 4x4@0.5,2x2\nbase: null\nmodel: T/2\nsteps: 2\nbatch_size: 4\nprogress: false\n"
                    f"out_dir: {tmp_path / 'cli'}\n")
    main(["train", str(path)])
    assert "trained 4x4@0.5,2x2 for 2 steps" in capsys.readouterr().out
    for argv, message in [(["train", str(tmp_path / "missing.yaml")], "config file not found"),
                          (["train", str(path), "schedule=2x2@0.5,4x4"], "must not grow"),
                          (["train"], "name a trainer config"),
                          (["pretrain", "device=cuda:0"] if not torch.cuda.is_available() else ["train", "trainer=zzz"],
                           "no CUDA device" if not torch.cuda.is_available() else "unknown trainer")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
