import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ppsearch.data import load_digits
from ppsearch.fid import FID, INCEPTION_WEIGHTS_FILE, FIDConfig, FIDError, default_cache_dir, to_uint8


@pytest.fixture(scope="module")
def digits():
    train, reference = load_digits("train"), load_digits("reference")
    every4 = torch.arange(0, len(train), 4)  # 1,000 train digits, 100 per class
    return train.images[every4], train.labels[every4], reference


@pytest.fixture(scope="module")
def fid(digits, tmp_path_factory):
    return FID(FIDConfig(cache_dir=str(tmp_path_factory.mktemp("fid"))), digits[2], "digits-reference")


@pytest.fixture(scope="module")
def real(fid, digits):
    """FID of 1,000 train digits against the 1,000 reference digits."""
    x, y, _ = digits
    return fid.score(x, y)


def shifted(x, pixels):
    return F.pad(x, (pixels, 0, pixels, 0), value=-1.0)[..., :16, :16]


def test_real_digits_score_low_and_corruptions_high(fid, digits, real):
    x, y = digits[0][::4], digits[1][::4]  # 250 digits, all classes
    assert real.fid < 10
    assert 0 < real.fid_std < real.fid
    noise = fid.score(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).fid
    blurred = fid.score(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), y).fid
    moved = fid.score(shifted(x, 2), y).fid
    assert min(noise, blurred, moved) > 10 * real.fid
    assert noise > blurred and noise > moved


def test_disjoint_halves_of_the_reference_are_close(digits, tmp_path):
    reference = digits[2]
    half = FID(FIDConfig(cache_dir=str(tmp_path)), reference.images[0::2], "digits-reference-even")
    assert half.score(reference.images[1::2], reference.labels[1::2]).fid < 12


def test_result_record(fid, digits, real):
    record = json.loads(json.dumps(real.to_dict()))
    assert record["extractor"] == "ppsearch-digits" and record["feature_layer"] == "128"
    assert record["extractor_weights"].startswith("digits_classifier.safetensors:")
    assert record["num_samples"] == 1000 and record["reference_samples"] == 1000
    assert record["reference_key"] == "digits-reference-ppsearch-digits-128-1x16x16-n1000"
    assert record["num_splits"] == 5 and len(record["split_fids"]) == 5
    assert record["fid_std"] == pytest.approx(np.std(record["split_fids"], ddof=1) / 5 ** 0.5)
    x, y = digits[0][::10], digits[1][::10]
    assert fid.score(x, y).fid == fid.score(x, y).fid  # deterministic


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU features: sqrtm still converges
def test_matches_a_direct_frechet_distance(fid, digits):
    x, y, reference = digits[0][::2], digits[1][::2], digits[2]
    a, b = fid.features(x).numpy(), fid.features(reference.images).numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean)
    assert fid.score(x, y).fid == pytest.approx(direct, rel=1e-6)


def test_matches_torch_fidelity_calculate_metrics(fid, digits):
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = to_uint8(images)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    x, y, reference = digits[0][::4], digits[1][::4], digits[2]
    metrics = torch_fidelity.calculate_metrics(
        input1=Images(x), input2=Images(reference.images), feature_extractor="ppsearch-digits", fid=True,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=500)
    assert fid.score(x, y).fid == pytest.approx(metrics["frechet_inception_distance"], rel=1e-4)


def test_samples_scored_in_parts(fid, digits):
    x, y = digits[0][::4], digits[1][::4]
    features = torch.cat([fid.features(part) for part in x.split(100)])
    assert fid.score_features(features, y).to_dict() == fid.score(x, y).to_dict()


def test_splits_are_stratified_by_label(fid, digits):
    from ppsearch.fid import _splits

    x, y, _ = digits
    splits = _splits(len(y), 5, y)
    assert sorted(torch.cat(splits).tolist()) == list(range(len(y)))
    for index in splits:
        assert torch.bincount(y[index], minlength=10).tolist() == [20] * 10


def test_reference_stats_cache(digits, tmp_path):
    _, _, reference = digits
    config = FIDConfig(cache_dir=str(tmp_path))
    images = reference.images[:300].clone()
    first = FID(config, images, "digits-ref")
    assert not first.stats_from_cache and first.cache_path.is_file()
    second = FID(config, images, "digits-ref")
    assert second.stats_from_cache
    np.testing.assert_array_equal(second.sigma, first.sigma)

    images[0, 0, 8, 8] = -images[0, 0, 8, 8]  # same key, other content
    changed = FID(config, images, "digits-ref")
    assert not changed.stats_from_cache and changed.cache_path == first.cache_path
    assert FID(config, images, "digits-ref").stats_from_cache

    fewer = FID(config, images[:200], "digits-ref")  # another count is another file
    assert not fewer.stats_from_cache and fewer.cache_path != first.cache_path

    first.cache_path.write_bytes(b"torn")
    assert not FID(config, images, "digits-ref").stats_from_cache


def test_cache_rebuilt_for_other_extractor_weights(digits, tmp_path):
    from ppsearch.features import load_digits_classifier, save_digits_classifier

    model = load_digits_classifier()
    with torch.no_grad():
        model.fc.weight.mul_(1.01)
    other = tmp_path / "other.safetensors"
    save_digits_classifier(model, other)
    images = digits[2].images[:200]
    cache = str(tmp_path / "cache")
    shipped = FID(FIDConfig(cache_dir=cache), images, "ref")
    retrained = FID(FIDConfig(cache_dir=cache, feature_extractor_weights_path=str(other)), images, "ref")
    assert not retrained.stats_from_cache and retrained.cache_path == shipped.cache_path
    assert not np.allclose(retrained.mu, shipped.mu)
    assert retrained.extractor_weights.startswith("other.safetensors:")
    with safe_open(str(retrained.cache_path), framework="pt") as f:
        assert retrained._extractor_fingerprint == f.metadata()["extractor"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PPSEARCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fid"
    monkeypatch.delenv("PPSEARCH_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "ppsearch", "fid")


def test_reference_from_a_dataset_of_pairs(fid, digits, tmp_path):
    reference = digits[2]
    pairs = torch.utils.data.TensorDataset(reference.images, reference.labels)  # no .images attribute
    from_pairs = FID(FIDConfig(cache_dir=str(tmp_path)), pairs, "digits-reference")
    np.testing.assert_allclose(from_pairs.mu, fid.mu)


class _Untouchable(torch.utils.data.Dataset):
    """A reference that fails the test if FID looks at it."""

    def __len__(self):
        raise AssertionError("reference read before the settings were checked")

    def __getitem__(self, i):
        raise AssertionError("reference read before the settings were checked")


def test_inception_without_weights_fails_before_any_work(tmp_path):
    config = FIDConfig(extractor="inception", cache_dir=str(tmp_path))
    with pytest.raises(FIDError, match=f"feature_extractor_weights_path.*{INCEPTION_WEIGHTS_FILE}"):
        config.check()
    with pytest.raises(FIDError, match="feature_extractor_weights_path"):
        FID(config, _Untouchable(), "imagenet")
    missing = FIDConfig(extractor="inception", feature_extractor_weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=f"feature_extractor_weights_path .*nope.pth.*{INCEPTION_WEIGHTS_FILE}"):
        FID(missing, _Untouchable(), "imagenet")


def test_inception_weights_that_are_not_a_state_dict(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"net": argparse.Namespace(a=1)}, path)  # arbitrary pickle: refused before torch-fidelity loads it
    with pytest.raises(FIDError, match="cannot read .* as a state dict of tensors"):
        FID(FIDConfig(extractor="inception", feature_extractor_weights_path=str(path)), _Untouchable(), "x")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    config = FIDConfig(extractor="inception", feature_extractor_weights_path=str(tmp_path / "foreign.pth"))
    with pytest.raises(FIDError, match="does not hold inception-v3-compat weights"):
        FID(config, _Untouchable(), "x")


@pytest.mark.parametrize("kwargs, message", [
    (dict(extractor="clip"), "unknown FID extractor 'clip'"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_splits=-1), "num_splits"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(FIDError, match=message):
        FIDConfig(**kwargs)


def test_bad_inputs(fid, digits, tmp_path):
    x, y, reference = digits
    with pytest.raises(FIDError, match="feature_layer 'pool'"):
        FID(FIDConfig(feature_layer="pool", cache_dir=str(tmp_path)), _Untouchable(), "x")
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        FID(FIDConfig(feature_extractor_weights_path=str(tmp_path / "w.safetensors")), _Untouchable(), "x")
    with pytest.raises(FIDError, match=r"\(1, 8, 8\) but .* has \(1, 16, 16\)"):
        fid.score(x[:, :, :8, :8])
    with pytest.raises(FIDError, match="decoded first"):
        FID(FIDConfig(cache_dir=str(tmp_path)), torch.zeros(10, 4, 16, 16), "latents")
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of 1000 samples are not finite"):
        fid.score(bad)
    with pytest.raises(FIDError, match="at least 10 samples"):
        fid.score(x[:6])
    with pytest.raises(FIDError, match="labels"):
        fid.score(x, y[:10])


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A file with the tensors of pytorch-fid's Inception weights (torchvision's Inception3
    with 1008 classes and no auxiliary head), randomly initialised."""
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), path)
    return path


def test_inception_from_a_local_file(inception_weights, tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(6, 1, 16, 16, generator=generator) * 2 - 1
    config = FIDConfig(extractor="inception", feature_extractor_weights_path=str(inception_weights),
                       feature_layer="64", num_splits=0, cache_dir=str(tmp_path))
    fid = FID(config, reference, "noise")
    assert fid._input(reference).shape == (6, 3, 16, 16)  # grey repeated to RGB, as torch-fidelity expects
    result = fid.score(torch.rand(6, 1, 16, 16, generator=generator) * 2 - 1)
    assert np.isfinite(result.fid) and result.fid >= -1e-6 and result.fid_std is None
    assert result.extractor == "inception-v3-compat" and result.feature_layer == "64"
    assert result.extractor_weights.startswith(f"{INCEPTION_WEIGHTS_FILE}:")
    assert FID(config, reference, "noise").stats_from_cache


@pytest.mark.slow
def test_inception_default_layer(inception_weights, tmp_path):
    config = FIDConfig(extractor="inception", feature_extractor_weights_path=str(inception_weights),
                       num_splits=0, cache_dir=str(tmp_path))
    fid = FID(config, torch.rand(3, 3, 8, 8) * 2 - 1, "noise")
    result = fid.score(torch.rand(3, 3, 8, 8) * 2 - 1)
    assert fid.mu.shape == (2048,) and result.feature_layer == "2048" and np.isfinite(result.fid)
