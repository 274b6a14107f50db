"""Tests for qdrop.models and qdrop.data: loaders, the model zoo, and pretrained accuracy on real data."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from qdrop.data import DataError, Split, data_root, load_cifar10, load_fashion_mnist, load_split
from qdrop.data.fashion_mnist import SYSTEM_DIR
from qdrop.io import torch_threads
from qdrop.models import ModelError, ModelInfo, SmallResNet, cifar_resnet, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "cifar10" / "test.npz").is_file(), reason=f"real data not found in {SHARED}"
)


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """No network, no writes to the real cache, one thread (the test machines are shared)."""
    monkeypatch.setenv("QDROP_OFFLINE", "1")
    monkeypatch.setenv("QDROP_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("QDROP_DATA", raising=False)
    with torch_threads(1):
        yield


def top1(model: torch.nn.Module, split: Split, batch: int = 500) -> float:
    with torch.no_grad():
        correct = sum(
            (model(split.x[i : i + batch]).argmax(1) == split.y[i : i + batch]).sum().item()
            for i in range(0, len(split), batch)
        )
    return 100.0 * correct / len(split)


# ---------------------------------------------------------------- synthetic data writers


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An uint8 IDX file; `magic` overrides the header's magic number."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 4) -> None:
    """Tiny PNGs, each a uniform gray level unique to the image, so images can be told apart after preprocessing."""
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            level = 10 * (c * per_class + i) + 5
            Image.new("RGB", (8, 12), (level, level, level)).save(root / f"class{c}" / f"img{i}.png")


def image_ids(split: Split) -> set[int]:
    """Recover the gray level of each image (the "imagenet" preprocessing of channel 0)."""
    levels = (split.x[:, 0, 0, 0] * 0.229 + 0.485) * 255
    return set(levels.round().int().tolist())


# ---------------------------------------------------------------- pretrained accuracy (real data)


@needs_shared
@pytest.mark.shared_data
@pytest.mark.parametrize("depth, readme_top1", [(20, 81.0), (32, 82.6)])
def test_cifar_resnet_pretrained_top1_matches_readme(depth, readme_top1):
    # test.npz is sorted by class, so the limit takes a fixed random 2000 (the first 2000 are two classes only).
    split = load_split("cifar10", "test", data=SHARED, limit=2000)
    model, info = load_model(f"cifar10_resnet{depth}", data=SHARED)
    assert info == ModelInfo(f"cifar10_resnet{depth}", "cifar10", "cifar", (3, 32, 32), 10)
    assert not model.training
    assert split.x.shape == (2000, 3, 32, 32)
    assert abs(top1(model, split) - readme_top1) <= 2.5


@needs_shared
@pytest.mark.shared_data
def test_efficientnet_lite0_top1_on_imagenet_samples():
    model, info = load_model("efficientnet_lite0")
    assert (info.dataset, info.preprocess, info.input_shape) == ("imagefolder", "tf_inception", (3, 224, 224))
    split = load_split("imagefolder", "test", data=SHARED, preprocess=info.preprocess, limit=100)
    assert split.x.shape == (100, 3, 224, 224)
    assert "calibrate on 500, evaluate on the other 500" in split.description
    assert top1(model, split, batch=50) >= 80.0


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_fx_trace_matches_eager(depth):
    torch.manual_seed(depth)
    model = cifar_resnet(depth)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1)  # non-trivial BN statistics, so a mis-traced BN would show
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
    assert expected.shape == (4, 10)
    pickle.loads(pickle.dumps(model))  # no lambdas inside (the original LambdaLayer could not be pickled)
    blocks = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3


def test_small_resnet_shapes_and_fx_trace():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected, rtol=0, atol=0)
    assert expected.shape == (5, 10)
    # Every stage downsamples (strides 2, 2, 2), so each has a projection shortcut; ReLUs are modules.
    assert isinstance(model.layer1.shortcut[0], torch.nn.Conv2d) and model.layer1.shortcut[0].stride == (2, 2)
    assert isinstance(model.layer2.shortcut[0], torch.nn.Conv2d) and model.layer2.shortcut[0].stride == (2, 2)
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 7


@needs_shared
def test_cifar_checkpoint_keys_load_strictly():
    path = SHARED / "cifar10" / "resnet20-12fca82f.th"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = cifar_resnet(20, path)
    state = model.state_dict()
    # The checkpoint predates BatchNorm's num_batches_tracked buffer, which load_state_dict fills in.
    assert {k for k in state if not k.endswith("num_batches_tracked")} == {k.removeprefix("module.") for k in checkpoint}
    assert torch.equal(state["linear.weight"], checkpoint["module.linear.weight"])


def test_unknown_model_names_raise_model_error():
    for name in ["resnet18", "cifar10_resnet21", "cifar10_resnetX", "module:no_factory.py"]:
        with pytest.raises(ModelError) as err:
            load_model(name)
        assert name in str(err.value)
    with pytest.raises(ModelError, match="torchvision:NAME"):
        load_model("nope")
    with pytest.raises(ModelError, match="no classification model"):
        load_model("torchvision:not_a_model", pretrained=False)


def test_missing_weights_raise_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError, match="resnet44-"):
        load_model("cifar10_resnet44", data=tmp_path)  # offline: no file, no download
    with pytest.raises(ModelError, match="qdrop demo"):
        load_model("fmnist_resnet")
    with pytest.raises(ModelError, match="pretrained=False"):
        load_model("torchvision:resnet18")  # weights not in the (empty) torch hub cache
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model("fmnist_resnet", weights=str(tmp_path / "missing.pt"))


def test_random_init_and_weights_files(tmp_path, monkeypatch):
    model, info = load_model("cifar10_resnet56", pretrained=False)
    assert not model.training and info.num_classes == 10

    trained = SmallResNet()
    torch.nn.init.constant_(trained.fc.bias, 0.25)
    cache = Path(tmp_path / "cache")
    monkeypatch.setenv("QDROP_CACHE", str(cache))
    (cache / "models").mkdir(parents=True)
    torch.save(trained.state_dict(), cache / "models" / "fmnist_resnet.pt")
    model, info = load_model("fmnist_resnet")
    assert (info.dataset, info.preprocess, info.input_shape) == ("fashion_mnist", "fmnist", (1, 28, 28))
    assert torch.equal(model.fc.bias, torch.full((10,), 0.25)) and not model.training

    # A checkpoint that does not fit the architecture is a ModelError, not a bare RuntimeError.
    with pytest.raises(ModelError, match="does not fit"):
        load_model("cifar10_resnet20", weights=str(cache / "models" / "fmnist_resnet.pt"))

    model, info = load_model("torchvision:resnet18", pretrained=False)
    assert info.preprocess == "imagenet" and info.num_classes == 1000 and not model.training


def test_module_factory(tmp_path):
    file = tmp_path / "my_model.py"
    file.write_text(
        "import torch.nn as nn\n"
        "def plain():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).train()\n"
        "def with_info():\n    return nn.Linear(4, 2), {'dataset': 'cifar10', 'input_shape': [4], 'num_classes': 2}\n"
        "def bad_info():\n    return nn.Linear(4, 2), {'colour': 'red'}\n"
    )
    model, info = load_model(f"module:{file}:plain")
    assert not model.training
    assert info == ModelInfo(f"module:{file}:plain", "custom", "imagenet", (3, 224, 224), 1000)
    _, info = load_model(f"module:{file}:with_info")
    assert (info.dataset, info.input_shape, info.num_classes) == ("cifar10", (4,), 2)
    with pytest.raises(ModelError, match="colour"):
        load_model(f"module:{file}:bad_info")
    with pytest.raises(ModelError, match="no function"):
        load_model(f"module:{file}:missing")


# ---------------------------------------------------------------- data


def test_data_root_precedence(tmp_path, monkeypatch):
    assert data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("QDROP_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(str(tmp_path)) == tmp_path
    monkeypatch.delenv("QDROP_DATA")
    if SHARED.is_dir():
        assert data_root() == SHARED.resolve()


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    x, y = load_fashion_mnist(tmp_path, "test")
    assert x.dtype == np.uint8 and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, magic=0x0801)  # a labels header on images
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(16)))
    with pytest.raises(DataError, match="header says"):
        load_fashion_mnist(tmp_path, "test")


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_files():
    x, y = load_fashion_mnist(None, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert np.array_equal(np.bincount(y), [1000] * 10)
    split = load_split("fashion_mnist", "calib", limit=64, seed=3)
    assert split.x.shape == (64, 1, 28, 28) and split.x.dtype == torch.float32
    assert 0 <= split.y.min() and split.y.max() <= 9
    assert "60000" in split.description


def test_fashion_mnist_missing_everywhere_names_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr("qdrop.data.fashion_mnist.SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path, "train")
    assert str(tmp_path) in str(err.value)


def test_cifar10_official_batches(tmp_path):
    """The python pickles store planar RGB rows; the loader returns HWC images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    image = np.arange(3 * 32 * 32, dtype=np.uint32).astype(np.uint8).reshape(3, 32, 32)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.stack([image.reshape(-1)] * 2), b"labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x[0], image.transpose(1, 2, 0))
    assert y.tolist() == [1, 7] * 5
    assert load_cifar10(tmp_path, "test")[0].shape == (2, 32, 32, 3)


def test_cifar10_download_is_checked_and_atomic(tmp_path, monkeypatch):
    """The tarball path, served from a file:// URL: md5 checked, batches unpacked into place."""
    import tarfile

    from qdrop.data.download import md5sum

    source = tmp_path / "src" / "cifar-10-batches-py"
    source.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}
        (source / name).write_bytes(pickle.dumps(batch))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    monkeypatch.delenv("QDROP_OFFLINE")
    monkeypatch.setattr("qdrop.data.cifar10.URL", archive.as_uri())

    monkeypatch.setattr("qdrop.data.cifar10.MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum"):
        load_cifar10(tmp_path / "root", "test")
    assert list((tmp_path / "root").iterdir()) == []  # nothing half-written left behind

    monkeypatch.setattr("qdrop.data.cifar10.MD5", md5sum(archive))
    x, y = load_cifar10(tmp_path / "root", "test")
    assert x.shape == (3, 32, 32, 3) and y.tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar-10-batches-py"]


def test_cifar10_npz_calib_subset_is_seeded_and_from_train(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [("train_subset.npz", 40), ("test.npz", 20)]:
        x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        np.savez(tmp_path / name, x=x, y=np.arange(n) % 10)
    # `data` may be the data root (looks in root/cifar10) or the cifar10 folder itself.
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cifar10").symlink_to(tmp_path)
    a = load_split("cifar10", "calib", data=tmp_path / "root", limit=8, seed=0)
    b = load_split("cifar10", "calib", data=tmp_path, limit=8, seed=0)
    c = load_split("cifar10", "calib", data=tmp_path, limit=8, seed=1)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.x.shape == (8, 3, 32, 32) and "train_subset.npz" in a.description
    full = load_split("cifar10", "test", data=tmp_path)
    assert len(full) == 20 and "test.npz" in full.description
    with pytest.warns(UserWarning, match="only 40"):
        assert len(load_split("cifar10", "calib", data=tmp_path, limit=100)) == 40


def test_imagefolder_halves_are_disjoint_and_fixed(tmp_path):
    write_imagefolder(tmp_path, classes=3, per_class=4)
    calib = load_split("imagefolder", "calib", data=tmp_path)
    test = load_split("imagefolder", "test", data=tmp_path)
    assert calib.x.shape == (6, 3, 224, 224) and len(test) == 6
    assert image_ids(calib).isdisjoint(image_ids(test))
    assert image_ids(calib) | image_ids(test) == {10 * i + 5 for i in range(12)}
    assert "calibrate on 6, evaluate on the other 6" in calib.description
    # Labels follow the sorted class folders (image i of class c has gray level 10*(4c+i)+5).
    for split in (calib, test):
        levels = (split.x[:, 0, 0, 0] * 0.229 + 0.485) * 255
        assert torch.equal(split.y, (levels.round() - 5).div(40, rounding_mode="floor").long())
    # The halves do not depend on the calibration seed; the seed only picks within the calib half.
    assert image_ids(load_split("imagefolder", "calib", data=tmp_path, seed=7)) == image_ids(calib)
    assert image_ids(load_split("imagefolder", "calib", data=tmp_path, limit=3, seed=7)) <= image_ids(calib)
    with pytest.warns(UserWarning, match="only 6"):
        assert len(load_split("imagefolder", "calib", data=tmp_path, limit=50)) == 6
    tf = load_split("imagefolder", "test", data=tmp_path, preprocess="tf_inception")
    torch.testing.assert_close(tf.x[:, 0, 0, 0] * 128 + 127, (test.x[:, 0, 0, 0] * 0.229 + 0.485) * 255)


def test_imagefolder_train_val_layout(tmp_path):
    write_imagefolder(tmp_path / "train", classes=2, per_class=3)
    write_imagefolder(tmp_path / "val", classes=2, per_class=1)
    assert len(load_split("imagefolder", "calib", data=tmp_path)) == 6
    assert load_split("imagefolder", "test", data=tmp_path).y.tolist() == [0, 1]


def test_large_imagefolder_test_split_is_decoded_per_batch(tmp_path, monkeypatch):
    """Above EAGER_TEST_IMAGES the test split is a LazyImages: slices decode to exactly the
    eager tensor, and evaluation gives the same accuracy."""
    import qdrop.data as data_mod
    from qdrop.data import LazyImages
    from qdrop.eval.metrics import top1

    write_imagefolder(tmp_path, classes=3, per_class=4)
    eager = load_split("imagefolder", "test", data=tmp_path)
    monkeypatch.setattr(data_mod, "EAGER_TEST_IMAGES", 2)
    lazy = load_split("imagefolder", "test", data=tmp_path)
    assert isinstance(lazy.x, LazyImages) and not isinstance(eager.x, LazyImages)
    assert len(lazy) == len(eager) == 6 and lazy.x.shape == eager.x.shape
    assert torch.equal(lazy.y, eager.y)
    assert torch.equal(lazy.x[1:4], eager.x[1:4]) and torch.equal(lazy.x[5], eager.x[5])
    assert "decoded per batch" in lazy.description
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    assert top1(model, lazy.x, lazy.y, batch_size=4) == top1(model, eager.x, eager.y, batch_size=4)
    assert len(load_split("imagefolder", "calib", data=tmp_path).x) == 6  # calibration stays in memory
    with pytest.raises(TypeError, match="slice"):
        lazy.x[[0, 1]]
    (tmp_path / "class1" / "img2.png").write_bytes(b"not a png")  # a broken file names itself
    with pytest.raises(DataError, match="cannot decode image .*img2.png"):
        lazy.x[0:6]


def test_missing_or_empty_data_raise_data_error(tmp_path):
    for dataset in ["cifar10", "fashion_mnist", "imagefolder"]:
        with pytest.raises(DataError, match="nowhere"):
            load_split(dataset, "test", data=tmp_path / "nowhere")
    with pytest.raises(DataError, match="no images"):
        load_split("imagefolder", "calib", data=tmp_path)
    with pytest.raises(DataError, match=str(tmp_path)):
        load_split("cifar10", "calib", data=tmp_path)  # empty folder, and downloads are off
    with pytest.raises(DataError):
        load_split("cifar10", "test", data="")
    with pytest.raises(ValueError, match="does not apply"):
        load_split("cifar10", "test", data=tmp_path, preprocess="fmnist")
