"""Export where users train: a full-training YAML for ``ppsearch train``, plain JSON of the
schedule, and the official PPFlow code's arguments (PPF-2 and PPF-3 only)."""
import dataclasses
import json
import re

import optuna
import pytest

from ppsearch import query
from ppsearch.cli import main
from ppsearch.config import ConfigError, load_study, load_trainer
from ppsearch.schedule import Schedule
from ppsearch.store import Store, config_json

SCHEDULES = ["2x2", "4x4@0.5,2x2", "4x4@0.5,2x4@0.75,2x2", "4x4@0.3,2x2", "8x8@0.5,2x2",
             "4x4@0.5:cfg1.5,2x4@0.75:cfg4.0,2x2:cfg4.0", "4x4@0.5,2x4@0.8,2x2"]


def make_study(tmp_path, name, **trainer):
    """A study of the shipped config ``name`` whose trials are the SCHEDULES, all COMPLETE."""
    config = load_study(name)
    config.storage, config.export_dir = f"sqlite:///{tmp_path / name}.db", str(tmp_path / "exports")
    config.trainer = dataclasses.replace(config.trainer, **trainer)
    storage = optuna.storages.RDBStorage(config.storage)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=["minimize", "minimize"])
    for number, schedule in enumerate(SCHEDULES):
        gmacs = 1.0 - 0.05 * number
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=[gmacs, 10.0 + number],
                                                  user_attrs={"schedule": schedule, "relative_gmacs": gmacs,
                                                              "fid_std": 0.25, "fid_details": {"num_samples": 1000}}))
    with Store(config.storage) as store:
        study_id = storage.get_study_id_from_name(config.name)
        store.acquire(study_id, config.name, "maker", 60)
        store.set_identity(study_id, "uid-" + config.name, config_json(config))
        store.release(study_id, "maker")
    storage.engine.dispose()
    return config


def header(text: str) -> str:
    """A file's comment lines as one line."""
    return " ".join(line[2:] for line in text.splitlines() if line.startswith("# ") and line != "# @package _global_")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("toy"), "toy")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("imagenet"), "imagenet256_xl")


def test_yaml_states_the_full_training_recipe(toy, tmp_path):
    path = query.export_trial(toy, trial=2)
    assert path.name == "toy-trial2.yaml"
    assert path.read_text().startswith("# @package _global_\n# Trial 2 of study toy:")
    assert header(path.read_text()).startswith("Trial 2 of study toy: 4x4@0.5,2x4@0.75,2x2, 0.9 GMACs per sample "
                             "(1.11x faster than the base), FID 12 +- 0.25. A full-training recipe from the base, not the "
                             "trial's 50-step fine-tune from the study's warm start: 2000 steps of global batch 64 in "
                             "one process")
    trainer = load_trainer(str(path))
    assert (trainer.schedule, trainer.out_dir, trainer.steps, trainer.full_training) == (
        "4x4@0.5,2x4@0.75,2x2", "runs/toy-trial2", 2000, None)
    assert trainer.progress and trainer.eval_at_end and trainer.checkpoint_every == 250 and trainer.log_every == 100
    assert trainer.threads is None and trainer.eval.num_samples == 1000
    assert dataclasses.replace(trainer, schedule="2x2", out_dir="runs/toy", full_training=toy.trainer.full_training,
                               **{k: getattr(toy.trainer, k) for k in toy.trainer.full_training if k != "about"}) \
        == toy.trainer  # the recipe and nothing else


def test_yaml_of_the_imagenet_study_is_the_official_recipe(imagenet):
    path = query.export_trial(imagenet, trial=1)
    assert "the official PPFlow fine-tune from SiT-XL/2, fudan-generative-vision/PPFlow train.py" in header(
        path.read_text())
    trainer = load_trainer(str(path))
    assert (trainer.steps, trainer.batch_size, trainer.lr, trainer.ema_decay, trainer.warmup_steps, trainer.grad_clip,
            trainer.num_workers, trainer.use_gpu) == (600000, 256, 1e-4, 0.9999, 0, None, 8, True)
    assert trainer.base == imagenet.trainer.base and trainer.ray_address == "auto"  # the cluster the search used


def test_a_study_without_a_recipe_exports_the_trials_own(toy, tmp_path):
    config = make_study(tmp_path, "toy", full_training=None)
    text = header(query.export_trial(config, trial=1).read_text())
    assert "The trial's own recipe (200 steps): the study's trainer has no full_training block." in text


def test_a_typo_in_the_recipe_names_the_key(tmp_path):
    config = make_study(tmp_path, "toy", full_training={"stepz": 3})
    with pytest.raises(ConfigError, match="study toy: trainer.full_training: .*stepz"):
        query.export_trial(config, trial=1)


def test_json_round_trips_the_schedule(toy):
    path = query.export_trial(toy, trial=5, format="json")
    data = json.loads(path.read_text())
    assert path.suffix == ".json" and Schedule.from_dict(data) == Schedule.parse(SCHEDULES[5])
    assert Schedule.parse(data["schedule"]) == Schedule.from_dict(data)
    assert (data["trial"], data["gmacs"], data["fid"], data["fid_std"]) == (5, 0.75, 15.0, 0.25)


@pytest.mark.parametrize("trial, level, scales", [(1, 2, "1 1"), (2, 3, "1 1 1"), (5, 3, "1.5 4 4")])
def test_official_arguments_for_ppf2_and_ppf3(imagenet, trial, level, scales):
    lines = query.export_trial(imagenet, trial=trial, format="official").read_text().splitlines()
    train, sample = [line for line in lines if not line.startswith("#")]
    model = f"--model PPFlow_XL_{level} --image-size 256 --cfg-scales {scales}"
    assert train == (f"torchrun --nnodes=1 --nproc_per_node=8 train.py {model} --patch-level {level} "
                     f"--global-batch-size 256 --global-seed 0 --initialize_from {imagenet.trainer.base}")
    assert sample == f"python sample.py ODE {model} --num-sampling-steps 50 --sampling-method heun2"


@pytest.mark.parametrize("trial, message", [
    (0, "the official code has 2 or 3 stages .*; this schedule has 1$"),
    (3, "the official code fixes its boundaries at 0.5 and 0.75; this schedule ends its first stage at 0.3$"),
    (6, "the official code fixes its boundaries at 0.5 and 0.75; this schedule ends its second stage at 0.8$"),
    (4, "the official code's 2 stages have patches 4x4, 2x2; this schedule's have 8x8, 2x2$"),
])
def test_official_refuses_what_that_code_cannot_express(imagenet, capsys, trial, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--trial", str(trial), "--format", "official", "--out", "x.sh", f"storage={imagenet.storage}",
              "study=imagenet256_xl"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err.strip()), err


def test_official_refuses_a_base_it_cannot_build(toy, tmp_path):
    with pytest.raises(query.QueryError, match=r"from SiT-S/2, B/2, L/2 or XL/2 only; this study's base is the "
                                               r"embedded tiny base \(T/2\)$"):
        query.export_trial(toy, trial=1, format="official", out=tmp_path / "x.sh")
    assert not (tmp_path / "x.sh").exists()


def test_export_command_says_what_it_wrote(toy, capsys, tmp_path):
    for format, then in [("yaml", f"; train it with: ppsearch train {tmp_path / 'p.yaml'}"),
                         ("json", " (the schedule, its GMACs and FID)")]:
        out = tmp_path / f"p.{format}"
        main(["export", "--trial", "1", "--format", format, "--out", str(out), f"storage={toy.storage}",
              f"export_dir={toy.export_dir}"])
        assert capsys.readouterr().out == f"exported trial 1 of study toy to {out}{then}\n"
