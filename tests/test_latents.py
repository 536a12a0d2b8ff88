import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ppsearch.cli import main  # noqa: E402
from ppsearch.fid import to_uint8  # noqa: E402
from ppsearch.latents import (  # noqa: E402
    ImageFolder, LatentShards, LatentsError, center_crop, decode_latents, encode_images, load_vae,
    to_unit_range,
)

CLASSES = ["cat", "dog", "eel"]
SIZES = [(24, 24), (28, 20), (20, 32)]  # (w, h): square, landscape, portrait crops


def make_images(root, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[(label + i) % len(SIZES)]
            ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
            noise = rng.integers(0, 64, (h, w, 3))
            pixels = np.clip(ramp + noise + 40 * label, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}{'.png' if i % 2 else '.JPG'}")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs") / "images")


def run_cli(*argv):
    """Exit code of ``ppsearch ARGV`` (0 when it returns)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return 0


def latents_cli(images, vae, out, *extra):
    return run_cli("latents", "--images", images, "--vae", vae, "--out", out, "--image-size", 16,
                   "--batch-size", 2, "--shard-size", 4, "--workers", 0, "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def dataset(images, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    assert latents_cli(images, vae_dir, out) == 0
    return out


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("ppsearch latents: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last, last


def test_center_crop_is_adm_style():
    image = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    assert center_crop(image, 32).size == (32, 32)
    # a bright centre column survives the crop, the sides do not
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, 50:70] = 255
    out = np.asarray(center_crop(Image.fromarray(pixels), 40))
    assert out[:, 20].min() > 200 and out[:, 0].max() < 50


def test_image_folder_order_and_range(images):
    folder = ImageFolder(images, 16)
    assert folder.classes == CLASSES
    assert [rel for rel, _ in folder.samples[:2]] == ["cat/00.JPG", "cat/01.png"]
    assert [label for _, label in folder.samples] == [0, 0, 1, 1, 2, 2]
    x, y = folder[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64 and int(y) == 1
    assert x.float().std() > 10  # the patterned image, not a blank
    unit = to_unit_range(x)
    assert -1 <= unit.min() and unit.max() <= 1
    assert torch.equal(to_uint8(unit), x)


def test_cli_writes_shards_that_read_back(dataset, images, vae_dir, capsys):
    data = LatentShards(dataset, split="train")
    meta = json.loads((dataset / "train" / "meta.json").read_text())
    assert sorted(p.name for p in (dataset / "train").iterdir()) == [
        "meta.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert len(data) == 6 and data.shape == (4, 8, 8) and data.num_classes == 3
    assert data.classes == CLASSES and data.image_size == 16
    assert data.scale_factor == pytest.approx(0.18215) and meta["scale_factor"] == pytest.approx(0.18215)
    assert meta["images"] == str(images.resolve()) and meta["vae"] == str(vae_dir.resolve())
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    latent, label = data[3]
    assert latent.shape == (4, 8, 8) and latent.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1
    assert int(data[-1][1]) == 2
    with pytest.raises(IndexError):
        data[6]

    vae = load_vae(vae_dir)
    folder = ImageFolder(images, 16)
    x = to_unit_range(torch.stack([folder[i][0] for i in range(len(folder))]))
    expected = encode_images(vae, x)
    stored = torch.stack([data[i][0] for i in range(len(data))])
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    unscaled = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(stored, unscaled * 0.18215, rtol=1e-5, atol=1e-5)

    decoded = decode_latents(vae, stored[:2], scale_factor=data.scale_factor)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_dataset_works_in_a_dataloader(dataset):
    data = LatentShards(dataset)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == data.labels.tolist()
    import pickle

    again = pickle.loads(pickle.dumps(data))  # what spawned DataLoader workers receive
    torch.testing.assert_close(again[5][0], data[5][0])


def test_reference_images_are_real_and_deterministic(dataset, images):
    data = LatentShards(dataset)
    ref = data.reference_images(4, seed=1)
    assert len(ref) == 4 and ref[0].dtype == torch.uint8 and ref[0].shape == (3, 16, 16)
    same = data.reference_images(4, seed=1)
    assert all(torch.equal(ref[i], same[i]) for i in range(4))
    assert len(data.reference_images()) == 6
    assert data.reference_images(4, seed=2).indices != ref.indices
    folder = ImageFolder(images, 16)
    assert torch.equal(ref[0], folder[ref.indices[0]][0])
    with pytest.raises(LatentsError, match="7 reference images"):
        data.reference_images(7)


def test_rerun_checks_a_finished_job_and_refuses_another(dataset, images, vae_dir, capsys):
    shard = dataset / "train" / "shard-00000.safetensors"
    before = shard.stat().st_mtime_ns
    assert latents_cli(images, vae_dir, dataset) == 0
    assert shard.stat().st_mtime_ns == before
    code = latents_cli(images, vae_dir, dataset, "--dtype", "float16")
    one_line_error(capsys, code, "other settings", "--overwrite")
    assert latents_cli(images, vae_dir, dataset, "--overwrite") == 0
    assert shard.stat().st_mtime_ns != before
    assert len(LatentShards(dataset)) == 6


def test_resumes_an_interrupted_run(images, vae_dir, tmp_path):
    assert latents_cli(images, vae_dir, tmp_path) == 0
    split = tmp_path / "train"
    before = (split / "shard-00000.safetensors").stat().st_mtime_ns
    expected = torch.stack([LatentShards(tmp_path)[i][0] for i in range(6)])
    meta = json.loads((split / "meta.json").read_text())
    meta["complete"] = False
    (split / "meta.json").write_text(json.dumps(meta))
    (split / "shard-00001.safetensors").unlink()
    with pytest.raises(LatentsError, match="incomplete"):
        LatentShards(tmp_path)
    assert latents_cli(images, vae_dir, tmp_path) == 0
    assert (split / "shard-00000.safetensors").stat().st_mtime_ns == before  # kept, not redone
    data = LatentShards(tmp_path)
    torch.testing.assert_close(torch.stack([data[i][0] for i in range(6)]), expected)


def test_float16_storage(images, vae_dir, tmp_path):
    assert latents_cli(images, vae_dir, tmp_path, "--dtype", "float16", "--split", "val") == 0
    data = LatentShards(tmp_path, split="val")
    assert data[0][0].dtype == torch.float32
    with pytest.raises(LatentsError, match="no split 'train'.*splits there: val"):
        LatentShards(tmp_path)


@pytest.mark.parametrize("case, needles", [
    ("missing vae", ["VAE not found", "config.json"]),
    ("vae file", ["is a file"]),
    ("missing images", ["image folder not found"]),
    ("no classes", ["no class folders"]),
    ("no images", ["has no images"]),
    ("empty class", ["without images: eel"]),
    ("corrupt image", ["cannot read image", "00.JPG"]),
    ("foreign out", ["is not empty", "--overwrite"]),
    ("bad size", ["not a multiple"]),
])
def test_cli_errors_are_one_line(case, needles, images, vae_dir, tmp_path, capsys):
    vae, imgs, out, size = vae_dir, images, tmp_path / "out", []
    if case == "missing vae":
        vae = tmp_path / "nope"
    elif case == "vae file":
        vae = vae_dir / "config.json"
    elif case == "missing images":
        imgs = tmp_path / "nope"
    elif case == "no classes":
        imgs = tmp_path / "empty"
        imgs.mkdir()
    elif case == "no images":
        imgs = tmp_path / "empty"
        (imgs / "cat").mkdir(parents=True)
        (imgs / "cat" / "notes.txt").write_text("not an image")
    elif case == "empty class":
        imgs = make_images(tmp_path / "imgs", per_class=1)
        for f in (imgs / "eel").iterdir():
            f.unlink()
    elif case == "corrupt image":
        imgs = make_images(tmp_path / "imgs", per_class=1)
        (imgs / "dog" / "00.JPG").write_bytes(b"not a jpeg")
    elif case == "foreign out":
        (out / "train").mkdir(parents=True)
        (out / "train" / "mine.txt").write_text("keep")
    elif case == "bad size":
        size = ["--image-size", 15]
    code = latents_cli(imgs, vae, out, *size)
    one_line_error(capsys, code, *needles)


def corrupt(split, how):
    shard = split / "shard-00000.safetensors"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "garbage":
        shard.write_bytes(b"\x00" * 64)
    elif how == "wrong shape":
        save_file({"latents": torch.zeros(4, 4, 4, 4), "labels": torch.zeros(4, dtype=torch.int64)}, str(shard))
    elif how == "count mismatch":
        save_file({"latents": torch.zeros(4, 4, 8, 8), "labels": torch.zeros(3, dtype=torch.int64)}, str(shard))
    elif how == "too few":
        save_file({"latents": torch.zeros(3, 4, 8, 8), "labels": torch.zeros(3, dtype=torch.int64)}, str(shard))
    elif how == "bad label":
        save_file({"latents": torch.zeros(4, 4, 8, 8), "labels": torch.full((4,), 7)}, str(shard))
    elif how == "missing":
        shard.unlink()
    elif how == "extra":
        (split / "shard-00009.safetensors").write_bytes(b"")


@pytest.mark.parametrize("how, message", [
    ("truncated", "corrupt shard .*shard-00000"),
    ("garbage", "corrupt shard .*shard-00000"),
    ("wrong shape", r"shard-00000.safetensors has latents of shape \(4, 4, 4, 4\), expected \(N, 4, 8, 8\)"),
    ("count mismatch", "shard-00000.safetensors has labels"),
    ("too few", "shard-00000.safetensors holds 3 samples, expected 4"),
    ("bad label", "shard-00000.safetensors has label 7 outside"),
    ("missing", "missing shard .*shard-00000"),
    ("extra", "shard-00009.safetensors beyond the 2"),
])
def test_bad_shards_are_named(how, message, dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    corrupt(copy / "train", how)
    with pytest.raises(LatentsError, match=message):
        LatentShards(copy)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(LatentsError, match="latent dataset not found"):
        LatentShards(tmp_path / "nope")


@pytest.mark.parametrize("how, needles", [
    ("truncated", ["corrupt shard", "shard-00000.safetensors", "delete it"]),
    ("wrong shape", ["shard-00000.safetensors has latents of shape (4, 4, 4, 4)"]),
    ("bad label", ["shard-00000.safetensors has label 7"]),
])
def test_cli_names_a_damaged_shard(how, needles, dataset, images, vae_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    corrupt(copy / "train", how)
    one_line_error(capsys, latents_cli(images, vae_dir, copy), *needles)
