import json

import pytest
import torch

from ppsearch.cli import main
from ppsearch.config import EvalConfig, load_trainer
from ppsearch.data import DataConfig
from ppsearch.evaluate import Evaluator, fixed_labels
from ppsearch.fid import FIDConfig, INCEPTION_WEIGHTS_FILE
from ppsearch.schedule import Schedule
from ppsearch.checkpoint import EMBEDDED_BASE
from ppsearch.train import train

SMALL = ["eval.steps=2", "eval.batch_size=100"]


def _eval(capsys, tmp_path, *argv):
    main(["eval", *argv, f"eval.fid.cache_dir={tmp_path / 'fid'}", *SMALL])
    return capsys.readouterr().out


def test_embedded_base_is_shipped():
    assert EMBEDDED_BASE.is_file() and EMBEDDED_BASE.stat().st_size < 10 * 2**20


def test_eval_reports_fid_with_its_details(capsys, tmp_path):
    report = json.loads(_eval(capsys, tmp_path, "--schedule", "4x4@0.5,2x2", "--num-samples", "100", "--json",
                              "--out", str(tmp_path / "out")))
    assert report["fid"]["extractor"] == "ppsearch-digits" and report["fid"]["num_samples"] == 100
    assert report["fid"]["fid"] > 0 and report["fid"]["fid_std"] > 0 and len(report["fid"]["split_fids"]) == 5
    assert report["fid"]["reference_key"].startswith("digits-reference-16-ppsearch-digits")
    assert report["untrained_patch_shapes"] == ["4x4"]  # the embedded base knows 2x2 only
    assert 0.5 < report["relative_gmacs"] < 0.7 and report["gmacs"] > 0
    assert report["sampler"] == {"steps": 2, "solver": "euler", "guidance": 1.0, "seed": 0, "bf16": False,
                                 "cuda_graphs": False, "compile": False}
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["schedule"] == "4x4@0.5,2x2"
    assert (tmp_path / "out" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = _eval(capsys, tmp_path, "--schedule", "2x2", "--num-samples", "100")
    assert text.startswith("2x2: FID ") and "extractor ppsearch-digits" in text


def test_trials_share_noise_and_labels(tmp_path):
    config = EvalConfig(num_samples=50, fid=FIDConfig(cache_dir=str(tmp_path)))
    a, b = Evaluator(config, DataConfig(), "cpu"), Evaluator(config, DataConfig(), "cpu")
    assert torch.equal(a.noise, b.noise) and torch.equal(a.labels, b.labels)
    assert torch.bincount(fixed_labels(1000, 10, 0)).tolist() == [100] * 10
    assert fixed_labels(20, 10, 0)[:10].unique().numel() > 5  # shuffled: contiguous splits mix classes


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent.pt"], "not found"),
    (["--schedule", "4x4@0.5,8x8"], "must not grow"),
    (["data.resolution=8"], "takes 1x16x16 latents"),
    (["data.name=imagenet"], "unknown dataset"),
    (["eval.fid.extractor=inception"], "feature_extractor_weights_path"),
])
def test_eval_mistakes_are_one_line(capsys, tmp_path, argv, message):
    if "--schedule" not in argv:
        argv = ["--schedule", "2x2", *argv]
    with pytest.raises(SystemExit) as exit_info:
        _eval(capsys, tmp_path, *argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        _eval(capsys, tmp_path, "--schedule", "2x2", "--checkpoint", str(tmp_path / "bad.safetensors"))
    assert "cannot read checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_latent_path_end_to_end_with_a_tiny_vae(tmp_path):
    """Images -> VAE latents -> a model trained on them -> samples decoded by the same VAE ->
    Inception FID against the real images (random Inception weights from a local file)."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from torchvision.models.inception import Inception3

    from test_latents import make_images

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    images = make_images(tmp_path / "images", per_class=4)
    main(["latents", "--images", str(images), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "lat"),
          "--image-size", "16", "--device", "cpu", "--workers", "0"])
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), weights)
    config = load_trainer("pretrain_tiny", [
        "data.name=latents", f"data.path={tmp_path / 'lat'}", "data.resolution=8", "steps=2", "batch_size=4",
        "progress=false", f"out_dir={tmp_path / 'run'}", "eval.num_samples=10", "eval.batch_size=5", "eval.steps=2",
        "eval.fid.extractor=inception", f"eval.fid.feature_extractor_weights_path={weights}",
        "eval.fid.feature_layer=64", "eval.fid.num_splits=2", f"eval.fid.cache_dir={tmp_path / 'fid'}"])
    model = train(config).model
    assert model.config.in_channels == 4 and model.config.input_size == (8, 8)
    evaluator = Evaluator(config.eval, config.data, torch.device("cpu"))
    samples = evaluator.sample(model, Schedule.parse("2x2"))  # one batch
    assert samples.shape == (5, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1  # decoded images
    result = evaluator(model, Schedule.parse("2x2"))
    assert result.fid.extractor == "inception-v3-compat" and result.fid.num_samples == 10
    assert result.fid.fid == result.fid.fid  # finite number, not NaN
