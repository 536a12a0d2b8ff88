import pytest
import torch
from safetensors import safe_open

from ppsearch import features
from ppsearch.data import load_digits
from ppsearch.features import (
    DEFAULT_WEIGHTS, EXTRACTOR_NAME, DigitsClassifier, FeatureWeightsError, accuracy, load_digits_classifier,
    save_digits_classifier, train_digits_classifier,
)
from ppsearch.fid import to_uint8


@pytest.fixture(scope="module")
def reference():
    return load_digits("reference")


def test_shipped_weights_classify_the_reference_split(reference):
    model = load_digits_classifier()
    assert accuracy(model, reference.images, reference.labels) >= 0.97
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:  # the recipe travels with the weights
        assert float(f.metadata()["reference_accuracy"]) >= 0.97
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000


def test_registered_with_torch_fidelity(reference):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is features.DigitsFeatureExtractor
    extractor = create_feature_extractor(EXTRACTOR_NAME, ["128", "logits"], cuda=False)
    grey = to_uint8(reference.images[:50])
    feats, logits = extractor(grey)
    assert feats.shape == (50, 128) and logits.shape == (50, 10)
    assert (feats >= 0).all() and feats.std() > 0
    assert (logits.argmax(1) == reference.labels[:50]).float().mean() >= 0.9
    rgb_feats, _ = extractor(grey.expand(-1, 3, -1, -1))  # colour is averaged to grey
    torch.testing.assert_close(rgb_feats, feats)
    with pytest.raises(ValueError, match="uint8"):
        extractor(reference.images[:2])


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier().eval()
    path = tmp_path / "w.safetensors"
    save_digits_classifier(model, path, {"reference_accuracy": 0.5})
    loaded = load_digits_classifier(path)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="ppsearch features"):
        load_digits_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FeatureWeightsError, match="does not hold digits classifier weights"):
        load_digits_classifier(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeatureWeightsError, match="cannot read"):
        load_digits_classifier(tmp_path / "junk.safetensors")


def test_shift_moves_each_image_by_at_most_one_pixel():
    x = -torch.ones(64, 1, 16, 16)
    x[:, :, 8, 8] = 1
    shifted = features._shift(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    where = [tuple((img[0] == 1).nonzero()[0].tolist()) for img in shifted]
    assert {w for w in where} <= {(8 + dy, 8 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert len(set(where)) > 1


@pytest.mark.slow
def test_default_recipe_reproduces_the_shipped_accuracy():
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        shipped = float(f.metadata()["reference_accuracy"])
    state = torch.random.get_rng_state()
    _, report = train_digits_classifier(log=None)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert report["reference_accuracy"] >= 0.97
    assert abs(report["reference_accuracy"] - shipped) <= 0.01
