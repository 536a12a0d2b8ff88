import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

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


def _cli_trainer(tmp_path, **settings):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"schedule": "4x4@0.5,2x2", "base": None, "model": "T/2", "steps": 2,
                                    "batch_size": 4, "progress": False, "threads": 1,
                                    "out_dir": str(tmp_path / "run"), **settings}))
    return path


def test_a_global_batch_that_does_not_split_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(_cli_trainer(tmp_path)), "num_workers=3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "batch_size 4 (the global batch) does not split over 3 worker(s) x 1 accumulation step(s)" in err
    assert not (tmp_path / "run").exists()


def test_accumulation_and_resume_make_the_same_steps(tmp_path):
    """A step's draws depend on the step and the sample's place in the global batch only: two
    micro-steps of 4 make the step one batch of 8 makes, and a run resumes under another split
    (as under another number of workers) where it stopped."""
    def run(out, *overrides):
        return train(_tiny_trainer(tmp_path, f"out_dir={tmp_path / out}", "schedule=4x4@0.5,2x2", "threads=1",
                                   *overrides))

    straight = run("a", "steps=2")
    run("b", "steps=1", "accumulation=2")
    resumed = run("b", "steps=2", "accumulation=4")
    assert resumed.resumed_from == 1
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    weights = [torch.load(tmp_path / run / "train_state.pt", weights_only=True)["model"] for run in "ab"]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-6


def test_progress_lines_have_rate_and_eta_and_a_finished_run_says_so(tmp_path, capsys):
    path = _cli_trainer(tmp_path, log_every=1)
    main(["train", str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 1/2 loss \d+\.\d{4} \d+\.\d\d steps/s eta 0:00:\d\d", lines[0]), lines
    main(["train", str(path)])
    out = capsys.readouterr().out
    assert out == (f"4x4@0.5,2x2: already trained to step 2 in {tmp_path / 'run'} (raise steps to train on); "
                   f"weights: {tmp_path / 'run' / 'model.safetensors'}\n")


def test_fid_at_a_period_and_at_the_end(tmp_path, capsys):
    path = _cli_trainer(tmp_path, steps=4, eval_every=2, eval_at_end=True,
                        eval={"num_samples": 20, "steps": 2, "fid": {"cache_dir": str(tmp_path / "fid")}})
    main(["train", str(path)])
    out = capsys.readouterr().out
    assert re.search(r"^step 2: FID \d+\.\d\d \+- \d+\.\d\d \(20 samples, ppsearch-digits, EMA weights\)$", out, re.M)
    assert re.search(r"steps/s\); FID \d+\.\d\d \+- \d+\.\d\d \(20 samples, ppsearch-digits\); weights: ", out)
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())) == {"2", "4"}
    main(["train", str(path)])  # finished: its FID is read back, not measured again
    assert re.search(r"already trained to step 4 .*; FID \d+\.\d\d", capsys.readouterr().out)


def _start_train(path, *words):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ppsearch.cli", "train", str(path), *words], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_says_how_to_resume_and_the_run_resumes(tmp_path, signal_number, code):
    path = _cli_trainer(tmp_path, steps=100000, log_every=1)
    process, seen = _start_train(path), []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            break
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=120)
    out = "".join(seen) + out
    step = int(re.findall(r"^step (\d+)/", out, re.M)[-1])
    assert process.returncode == code and err == (
        f"ppsearch train: stopped by {signal.Signals(signal_number).name}: checkpoint at step {step} in "
        f"{tmp_path / 'run'}; resume with: ppsearch train {path}\n")
    assert load_trainer(str(path)) and (tmp_path / "run" / "model.safetensors").is_file()
    resumed = _start_train(path, f"steps={step + 2}")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and not err
    assert out.startswith(f"resuming from step {step} in {tmp_path / 'run'}\nstep {step + 1}/{step + 2} ")


def test_the_data_loader_uses_the_cpus_the_run_may_use(monkeypatch):
    from ppsearch.train import loader_workers

    trainer = load_trainer("pretrain_tiny", [])
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # what Ray sets in a task that reserved 6 CPUs
    assert loader_workers(trainer) == 5
    assert loader_workers(load_trainer("pretrain_tiny", ["threads=3"])) == 2
    assert loader_workers(load_trainer("pretrain_tiny", ["threads=1"])) == 0  # the loop's process reads
    assert loader_workers(load_trainer("pretrain_tiny", ["loader_workers=4", "threads=1"])) == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert loader_workers(trainer) == len(os.sched_getaffinity(0)) - 1
