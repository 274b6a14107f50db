"""benchmarks/convergence.py's data and variant helpers: the claims in docs/algorithms/beyond.md rest on them."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _convergence():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_augmented_views_are_crops_of_the_black_padded_images():
    from qdrop.data import IMAGENET_MEAN, IMAGENET_STD

    conv = _convergence()
    x = torch.randn(6, 3, 32, 32)
    v = conv.augmented_views(x, 3, seed=0)
    assert v.shape == (18, 3, 32, 32) and torch.equal(v[:6], x)
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    padded = black.expand(6, 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = x
    for k, img in enumerate(v[6:]):
        src = padded[k % 6]
        crops = [src[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(img, c) or torch.equal(img, c.flip(-1)) for c in crops)
    assert not torch.equal(v[6:12], v[12:18])  # the views differ from each other
    assert torch.equal(conv.augmented_views(x, 3, seed=0), v)  # and are reproducible from the seed
    assert torch.equal(conv.augmented_views(x, 1, seed=0), x)


def test_data_keys_of_a_variant_do_not_reach_the_stages():
    conv = _convergence()
    algo = conv.build_algorithm("qdrop-views4")
    assert [s for s in algo.stages] == [s for s in conv.build_algorithm("qdrop").stages]
    p1 = conv.build_algorithm("qdrop-p1").stages[0]
    assert (p1.drop_prob, p1.input_mix, p1.learn_acts) == (1.0, 1.0, True)


def test_compact_cifar_copy_gives_the_same_calibration_and_test_tensors(tmp_path):
    """benchmarks/compact_cifar.py (the CIFAR folder small enough for a lent GPU machine) must load, for its
    seed and calibration size, the very tensors the full folder gives, and nothing like them for another seed."""
    import pytest

    from qdrop.data import load_split

    cifar = ROOT.parent / "shared" / "data" / "cifar10"
    if not (cifar / "train_subset.npz").exists():
        pytest.skip("needs ../shared/data/cifar10")
    spec = importlib.util.spec_from_file_location("compact_cifar", ROOT / "benchmarks" / "compact_cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = tmp_path / "cifar10"
    mod.compact(cifar, small, calib=256, seed=3)
    assert (small / "train_subset.npz").stat().st_size < (cifar / "train_subset.npz").stat().st_size / 20
    full_c = load_split("cifar10", "calib", data=cifar, limit=256, seed=3)
    small_c = load_split("cifar10", "calib", data=small, limit=256, seed=3)
    assert torch.equal(full_c.x, small_c.x) and torch.equal(full_c.y, small_c.y)
    other = load_split("cifar10", "calib", data=cifar, limit=256, seed=4)
    assert not torch.equal(other.x, small_c.x)
    full_t = load_split("cifar10", "test", data=cifar, limit=500)
    small_t = load_split("cifar10", "test", data=small, limit=500)
    assert torch.equal(full_t.x, small_t.x) and torch.equal(full_t.y, small_t.y)
    assert sorted(p.name for p in small.glob("*.th")) == sorted(p.name for p in cifar.glob("*.th"))
