"""The shipped digit classifiers (digit-FID's feature space): weights, inputs, metrics, training, CLI."""

import json
import sys

import numpy as np
import pytest
import torch

import iddpm.metrics
from iddpm import features
from iddpm.cli import main
from iddpm.data import load_dataset, to_model_range
from iddpm.features import (
    FEATURE_DIM,
    checkpoint_path,
    classifier_accuracy,
    digit_features,
    digit_fid,
    digit_precision_recall,
    inception_fid,
    infer_kind,
    load_digit_classifier,
    prepare_digits,
    read_digit_classifier,
    train_digit_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits8", split="train"), load_dataset("digits8", split="test")


def _stored(kind: str) -> dict:
    return json.loads(checkpoint_path(kind).with_suffix(".json").read_text())


# --------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("kind", ["digits8", "mnist"])
def test_committed_weights_are_small_and_documented(kind):
    path = checkpoint_path(kind)
    assert path.is_file() and path.stat().st_size < 1_000_000
    meta = _stored(kind)
    keys = ("test_accuracy", "train_size", "test_size", "seed", "epochs", "command", "torch_version", "date")
    assert set(keys) <= set(meta)
    assert meta["command"].startswith(f"python -m iddpm features train --kind {kind}")
    assert meta["limit"] is None  # trained on the whole training split
    # A plain dict of tensors and builtins: loads with weights_only=True (no pickled classes).
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"format", "version", "config", "model"}


@pytest.mark.parametrize(("kind", "target"), [("digits8", 0.97), ("mnist", 0.98)])
def test_committed_weights_reach_the_stored_held_out_accuracy(kind, target):
    meta = _stored(kind)
    test = load_dataset(meta["dataset"], split="test")
    assert len(test) == meta["test_size"]
    acc = classifier_accuracy(load_digit_classifier(kind), test.images, test.labels)
    assert acc == pytest.approx(meta["test_accuracy"], abs=0.005)
    assert acc >= target
    if kind == "mnist":  # 16x16 digits (as generated at that size) are area-resized up to 28x28
        small = load_dataset("mnist5k", split="test", image_size=16)
        acc16 = classifier_accuracy(load_digit_classifier(kind), small.images, small.labels)
        assert acc16 == pytest.approx(meta["test_accuracy_16"], abs=0.005) and acc16 >= 0.97


def test_load_is_cached():
    assert load_digit_classifier("digits8") is load_digit_classifier("digits8")
    assert not load_digit_classifier("digits8").training


# --------------------------------------------------------------------------------------------------- features


def test_feature_shape_and_both_input_ranges_agree(digits8):
    _, test = digits8
    f = digit_features(test.images)
    assert f.shape == (len(test), FEATURE_DIM) and f.dtype == torch.float32 and torch.isfinite(f).all()
    torch.testing.assert_close(digit_features(to_model_range(test.images)), f)
    torch.testing.assert_close(digit_features(test.images.numpy()), f)  # numpy works too
    torch.testing.assert_close(digit_features(test.images, batch_size=7), f, rtol=1e-5, atol=1e-5)


def test_kind_is_inferred_from_the_size():
    assert infer_kind(8) == "digits8"
    assert infer_kind(16) == infer_kind(28) == infer_kind(32) == "mnist"
    x16 = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(digit_features(x16), digit_features(x16, kind="mnist"))
    # An explicit kind resizes to that network: 16x16 nearest-upscaled 8x8 digits area-average back exactly.
    x8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    up = x8.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(digit_features(up, kind="digits8"), digit_features(x8))


def test_digit_fid_is_small_between_real_splits_and_large_against_noise(digits8):
    train, test = digits8
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (len(test), 1, 8, 8), generator=gen, dtype=torch.uint8)
    real = digit_fid(test.images, train.images)
    assert 0 <= real < 0.05 * digit_fid(test.images, noise)
    assert digit_fid(test.images, test.images) == pytest.approx(0.0, abs=1e-6)
    assert iddpm.metrics.digit_fid is digit_fid  # also reachable from iddpm.metrics
    p, r = digit_precision_recall(test.images, train.images)
    assert p > 0.8 and r > 0.8
    p, r = digit_precision_recall(test.images, noise)
    assert p < 0.3 and r < 0.3  # measured 0.18, 0.05 with the committed weights


def test_digit_fid_on_mnist_ranks_one_class_against_all():
    test = load_dataset("mnist5k", split="test")
    train = load_dataset("mnist5k", split="train")
    same = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(test)]]
    ones = train.images[train.labels == 1]  # mode collapse onto one digit
    # measured: 0.74 vs 144 (digit-FID), recall 0.89 vs 0.15
    assert digit_fid(test.images, same) < 0.05 * digit_fid(test.images, ones)
    assert digit_precision_recall(test.images, same)[1] > 0.8
    precision, recall = digit_precision_recall(test.images, ones)
    assert precision > 0.8 and recall < 0.3


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ValueError, "1-channel"),
        (torch.zeros(4, 28, 28, 1, dtype=torch.uint8), ValueError, r"looks like \(N, H, W, C\)"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), ValueError, r"shape \(N, 1, H, W\)"),
        (torch.zeros(4, 1, 8, 9), ValueError, "square"),
        (torch.full((4, 1, 8, 8), 255.0), ValueError, r"model range \[-1, 1\]"),
        (torch.full((4, 1, 8, 8), float("nan")), ValueError, "NaN"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.int16), TypeError, "uint8"),
        (torch.zeros(0, 1, 8, 8), ValueError, "no images"),
        ([[0.0]], TypeError, "torch tensor or numpy array"),
    ],
)
def test_bad_images_give_clear_errors(images, error, match):
    with pytest.raises(error, match=match):
        prepare_digits(images)


def test_mixed_sizes_need_an_explicit_kind_and_unknown_kinds_are_refused():
    x8 = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    x28 = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="different digit classifiers"):
        digit_fid(x8, x28)
    with pytest.raises(ValueError, match="unknown digit classifier kind 'cifar'"):
        digit_features(x8, kind="cifar")
    with pytest.raises(FileNotFoundError, match="features train"):
        read_digit_classifier("/nonexistent/digit_classifier_mnist.pt")


def test_float_images_slightly_outside_the_range_are_clipped():
    x = torch.full((2, 1, 8, 8), 1.0005)
    assert prepare_digits(x).max() == 1.0


# --------------------------------------------------------------------------------------------------- training


def test_training_smoke_run_is_seeded():
    m1, info = train_digit_classifier("digits8", epochs=1, seed=3, limit=128)
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["train_size"] == 128 and info["epochs"] == 1
    m2, info2 = train_digit_classifier("digits8", epochs=1, seed=3, limit=128)
    assert info2["test_accuracy"] == info["test_accuracy"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_digit_classifier("digits8", epochs=0)


def test_cli_trains_and_writes_weights_and_json(tmp_path, capsys):
    argv = ["features", "train", "--kind", "digits8", "--epochs", "1", "--limit", "128", "--seed", "1"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    assert "digits8: held-out accuracy" in capsys.readouterr().out
    meta = json.loads((tmp_path / "digit_classifier_digits8.json").read_text())
    assert meta["command"] == "python -m iddpm features train --kind digits8 --epochs 1 --seed 1 --limit 128"
    assert meta["seed"] == 1 and meta["train_size"] == 128 and 0 <= meta["test_accuracy"] <= 1
    model = read_digit_classifier(tmp_path / "digit_classifier_digits8.pt")
    test = load_dataset("digits8", split="test")
    assert classifier_accuracy(model, test.images, test.labels) == pytest.approx(meta["test_accuracy"])
    assert digit_features(test.images[:5], model=model).shape == (5, FEATURE_DIM)


def test_cli_reports_bad_values(tmp_path, capsys):
    assert main(["features", "train", "--kind", "digits8", "--epochs", "0", "--out-dir", str(tmp_path)]) == 2
    assert "epochs must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["features", "train", "--kind", "cifar"])


# ------------------------------------------------------------------------------------------------- Inception


def test_inception_fid_explains_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` fail
    x = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_fid(x, x)
    assert features.digit_fid is digit_fid
