"""Tests for admm_jax.data: IDX/TFDS sources, hold-out, deterministic grain batches, prefetch."""
import gzip
import os
import socket
import time
import tracemalloc

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from admm_jax.app import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IN_CI = os.environ.get("CI") == "true"


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx(path, array, gz):
  raw = _idx_bytes(array)
  path = str(path) + (".gz" if gz else "")
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)
  return path


def _write_mnist_dir(root, n_train=50, n_test=20, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  for stem, array in arrays.items():
    _write_idx(root / stem, array, gz)
  return arrays


def _rows(images):
  return {img.tobytes() for img in images}


# ------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_roundtrips_plain_and_gzip(tmp_path, gz):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  labels = np.array([1, 2, 3, 9], np.uint8)
  got_images = data.load_idx(_write_idx(tmp_path / "img", images, gz))
  got_labels = data.load_idx(_write_idx(tmp_path / "lab", labels, gz))
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_images.dtype == np.uint8 and got_images.flags.writeable


@pytest.mark.parametrize("content", [
    b"",                                          # empty
    b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4,   # float32 type code
    b"\x12\x34\x08\x01",                           # bad magic prefix
    _idx_bytes(np.zeros((4, 3), np.uint8))[:-2],   # truncated data
    _idx_bytes(np.zeros((4,), np.uint8)) + b"x",   # trailing bytes
    _idx_bytes(np.zeros((2, 2, 2), np.uint8))[:9],  # ends inside the header
])
def test_load_idx_rejects_corrupt_file_naming_it(tmp_path, content):
  path = tmp_path / "bad-idx1-ubyte"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="bad-idx1-ubyte"):
    data.load_idx(path)


def test_load_idx_rejects_truncated_gzip(tmp_path):
  path = tmp_path / "x-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(_idx_bytes(np.zeros(100, np.uint8)))[:20])
  with pytest.raises(data.DataError, match="x-idx1-ubyte.gz"):
    data.load_idx(path)


def test_load_idx_missing_file_is_data_error(tmp_path):
  with pytest.raises(data.DataError, match="nope"):
    data.load_idx(tmp_path / "nope")


# ---------------------------------------------------------------------- local


@pytest.mark.parametrize("gz", [False, True])
def test_load_local_reads_generated_folder(tmp_path, gz):
  arrays = _write_mnist_dir(tmp_path, gz=gz)
  splits = data.load_local("mnist", tmp_path)
  assert set(splits) == {"train", "test"}
  x, y = splits["train"]
  assert x.shape == (50, 28, 28, 1) and x.dtype == np.uint8
  assert y.shape == (50,) and y.dtype == np.int32
  np.testing.assert_array_equal(x[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(splits["test"][1], arrays["t10k-labels-idx1-ubyte"])


def test_load_local_missing_dir_names_path_and_fix(tmp_path):
  missing = str(tmp_path / "no-such-dir")
  with pytest.raises(data.DataError) as info:
    data.load_local("fashion_mnist", missing)
  msg = str(info.value)
  assert missing in msg and "does not exist" in msg
  assert "train-images-idx3-ubyte.gz" in msg and "data.dir=''" in msg


def test_load_local_missing_file_is_named(tmp_path):
  _write_mnist_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DataError, match="lacks t10k-labels-idx1-ubyte"):
    data.load_local("mnist", tmp_path)


def test_load_local_rejects_mismatched_counts(tmp_path):
  _write_mnist_dir(tmp_path)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, np.uint8), gz=True)
  with pytest.raises(data.DataError, match="do not form one split"):
    data.load_local("mnist", tmp_path)


def test_load_local_rejects_cifar10(tmp_path):
  with pytest.raises(data.DataError, match="cifar10"):
    data.load_local("cifar10", tmp_path)


def _require_fashion_mnist():
  if not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
    if IN_CI:
      pytest.fail(f"CI=true but Fashion-MNIST is missing at {FASHION_DIR}: "
                  "apt-get install dataset-fashion-mnist in the CI setup.")
    pytest.skip(reason=f"Fashion-MNIST not installed at {FASHION_DIR} "
                "(apt-get install dataset-fashion-mnist)")


def test_load_local_real_fashion_mnist():
  _require_fashion_mnist()
  splits = data.load_local("fashion_mnist", FASHION_DIR)
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
  assert y_train.dtype == np.int32 and y_test.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(y_train), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(y_test), np.full(10, 1000))
  np.testing.assert_array_equal(y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  assert x_train.max() == 255 and abs(x_train.mean() - 72.94) < 0.01


def test_load_dataset_real_fashion_mnist_holds_out_validation():
  _require_fashion_mnist()
  ds = data.load_dataset("fashion_mnist", FASHION_DIR, validation_size=5000, seed=0)
  assert len(ds.train) == 55000 and len(ds.validation) == 5000
  assert len(ds.test) == 10000
  assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
  images, labels = data.Examples(ds.train.source, ds.train.positions[:3]).arrays()
  assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
  with pytest.raises(TypeError):
    ds.train[1]  # noqa: B018  # not the old (images, labels) tuple: no quiet misreads


# ----------------------------------------------------------------- load_dataset


def test_load_dataset_local_split_is_deterministic_and_disjoint(tmp_path):
  arrays = _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  a = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3)
  b = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3)
  c = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=4)
  np.testing.assert_array_equal(a.validation.arrays()[0], b.validation.arrays()[0])
  np.testing.assert_array_equal(a.train.arrays()[1], b.train.arrays()[1])
  assert not np.array_equal(a.validation.arrays()[0], c.validation.arrays()[0])
  assert len(a.train) == 80 and len(a.validation) == 20
  train, val = a.train.arrays()[0], a.validation.arrays()[0]
  assert not _rows(train) & _rows(val)
  assert _rows(train) | _rows(val) == _rows(arrays["train-images-idx3-ubyte"][..., None])


def test_held_out_examples_depend_on_the_seed_only(tmp_path):
  _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  load = lambda **kw: data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3, **kw)
  full, limited = load(), load(limit_train=16, limit_test=8)
  np.testing.assert_array_equal(full.validation.arrays()[0], limited.validation.arrays()[0])
  assert _rows(limited.train.arrays()[0]) <= _rows(full.train.arrays()[0])


def test_validation_in_limit_carves_validation_out_of_the_training_budget(tmp_path):
  _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  load = lambda **kw: data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3,
                                        limit_train=50, **kw)
  on_top, carved = load(), load(validation_in_limit=True)
  assert (len(on_top.train), len(on_top.validation)) == (50, 20)   # 70 labelled examples
  assert (len(carved.train), len(carved.validation)) == (30, 20)   # 50 in all
  np.testing.assert_array_equal(carved.validation.arrays()[0], on_top.validation.arrays()[0])
  np.testing.assert_array_equal(carved.train.arrays()[0], on_top.train.arrays()[0][:30])
  no_limit = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3,
                               validation_in_limit=True)
  assert len(no_limit.train) == 80   # without a limit there is no budget to carve from
  with pytest.raises(data.DataError, match="validation_size=20 leaves no training"):
    data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3, limit_train=20,
                      validation_in_limit=True)


def test_load_dataset_zero_validation_and_limits(tmp_path):
  _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  ds = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=0,
                         limit_train=16, limit_test=8)
  assert len(ds.validation) == 0 and ds.validation.arrays()[0].shape == (0, 28, 28, 1)
  assert len(ds.train) == 16 and ds.test.arrays()[0].shape == (8, 28, 28, 1)
  again = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=0,
                            limit_train=16, limit_test=8)
  np.testing.assert_array_equal(ds.train.arrays()[0], again.train.arrays()[0])
  other_seed = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=1,
                                 limit_train=16, limit_test=8)
  # The test subset does not depend on the seed.
  np.testing.assert_array_equal(ds.test.arrays()[0], other_seed.test.arrays()[0])


def test_load_dataset_rejects_bad_sizes(tmp_path):
  _write_mnist_dir(tmp_path, n_train=10)
  with pytest.raises(data.DataError, match="validation_size=10"):
    data.load_dataset("mnist", str(tmp_path), validation_size=10, seed=0)
  with pytest.raises(data.DataError, match="validation_size=-1"):
    data.load_dataset("mnist", str(tmp_path), validation_size=-1, seed=0)
  with pytest.raises(data.DataError, match="imagenet"):
    data.load_dataset("imagenet", "", validation_size=0, seed=0)
  with pytest.raises(data.DataError, match="data.dir=''"):
    data.load_dataset("cifar10", str(tmp_path), validation_size=0, seed=0)


# ------------------------------------------------------------------------ TFDS

TFDS_IMAGE_DATASETS = [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
                       ("cifar100", (32, 32, 3), 100), ("svhn_cropped", (32, 32, 3), 10)]


@pytest.mark.parametrize("name,shape,classes", TFDS_IMAGE_DATASETS)
def test_load_tfds_under_mock(tmp_path, name, shape, classes):
  with tfds.testing.mock_data(num_examples=40):
    sources = data.load_tfds(name, tmp_path)
  assert set(sources) == {"train", "test"}
  for split in sources.values():
    assert len(split) == 40 and split.num_classes == classes and split.image_shape == shape
    example = split[7]
    assert set(example) == {"image", "label"}
    assert example["image"].shape == shape and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < classes
    images, labels = split.read(np.array([7, 3, 7]))
    np.testing.assert_array_equal(images[0], example["image"])
    np.testing.assert_array_equal(images[2], images[0])
    assert images.shape == (3, *shape) and labels.dtype == np.int32


@pytest.mark.parametrize("name,shape,classes", TFDS_IMAGE_DATASETS)
def test_any_tfds_image_dataset_holds_out_validation_and_batches(tmp_path, name, shape, classes):
  with tfds.testing.mock_data(num_examples=64):
    full = data.load_tfds(name, tmp_path)["train"]
    ds = data.load_dataset(name, "", validation_size=16, seed=0, tfds_data_dir=str(tmp_path))
  assert len(ds.train) == 48 and len(ds.validation) == 16 and len(ds.test) == 64
  assert ds.image_shape == shape and ds.num_classes == classes
  train, val = ds.train.arrays()[0], ds.validation.arrays()[0]
  assert not _rows(train) & _rows(val)
  assert _rows(train) | _rows(val) == _rows([full[i]["image"] for i in range(64)])
  batches = data.epoch_batches(ds.train, 16, seed=0, epoch=0,
                               augment="cifar" if shape[0] == 32 else None)
  with data.prefetch(batches) as it:
    got = list(it)
  assert len(got) == 3 and got[0]["image"].shape == (16, *shape)
  assert got[0]["label"].dtype == np.int32 and got[0]["label"].max() < classes


def test_unknown_tfds_name_is_one_sentence_with_close_names(tmp_path):
  with pytest.raises(data.DataError) as info:
    data.load_tfds("cifar_10", tmp_path)
  msg = str(info.value)
  assert "'cifar_10'" in msg and "cifar10" in msg and "mnist" in msg and "\n" not in msg


@pytest.mark.parametrize("name,why", [("imdb_reviews", "not an image classification"),
                                      ("celeb_a", "ClassLabel 'label'"),
                                      ("imagenette", "fixed-size")])
def test_tfds_dataset_that_is_not_fixed_size_image_classification_is_refused(tmp_path, name,
                                                                               why):
  with tfds.testing.mock_data(num_examples=4), pytest.raises(data.DataError, match=why) as info:
    data.load_tfds(name, tmp_path)
  assert repr(name) in str(info.value)


def _peak_traced_bytes_of_training_and_eval_batches(num_examples: int) -> int:
  tracemalloc.start()
  try:
    with tfds.testing.mock_data(num_examples=num_examples):
      ds = data.load_dataset("cifar10", "", validation_size=1000, seed=0)
      train = data.epoch_batches(ds.train, 128, seed=0, epoch=3, augment="cifar")
      with data.prefetch(train, size=3) as it:
        assert len([b for _, b in zip(range(6), it)]) == 6
      test = data.epoch_batches(ds.test, 256, seed=0, epoch=0, shuffle=False,
                                drop_remainder=False)
      with data.prefetch(test) as it:
        assert len([b for _, b in zip(range(3), it)]) == 3
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_dataset():
  # A million mock CIFAR-10 examples: 3.1 GB of images if a split were materialised.
  small = _peak_traced_bytes_of_training_and_eval_batches(2_000)
  large = _peak_traced_bytes_of_training_and_eval_batches(1_000_000)
  mib = 2**20
  print(f"peak traced memory: 2k examples {small / mib:.1f} MiB, 1M examples {large / mib:.1f} MiB")
  assert large < small + 16 * mib and large < 64 * mib


def test_load_tfds_unprepared_without_download_fails_fast(tmp_path):
  # Real tfds, no mock: nothing prepared in an empty data_dir.
  start = time.monotonic()
  with pytest.raises(data.DataError) as info:
    data.load_tfds("mnist", tmp_path, download=False)
  assert time.monotonic() - start < 30
  msg = str(info.value)
  assert "'mnist'" in msg and "no prepared copy" in msg
  assert "network" in msg and "data.dir" in msg


def test_load_tfds_offline_fails_fast_with_both_ways_out(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: False)
  start = time.monotonic()
  with pytest.raises(data.DataError) as info:
    data.load_tfds("fashion_mnist", tmp_path)
  assert time.monotonic() - start < 30
  msg = str(info.value)
  assert "'fashion_mnist'" in msg and "no network" in msg
  assert "data.dir" in msg and "train-images-idx3-ubyte.gz" in msg
  with pytest.raises(data.DataError) as info:
    data.load_tfds("cifar10", tmp_path)
  assert "'cifar10'" in str(info.value) and "array_record" in str(info.value)
  assert "data.dir" not in str(info.value)  # no IDX way out for CIFAR


def test_load_tfds_wraps_download_failure(tmp_path, monkeypatch):
  def failing_source(name, *, split, data_dir, download):
    if download:
      raise ConnectionError("Failed to resolve 'storage.googleapis.com'")
    raise NotImplementedError("not prepared")

  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: True)
  monkeypatch.setattr(tfds, "data_source", failing_source)
  with pytest.raises(data.DataError, match=r"download failed: ConnectionError") as info:
    data.load_tfds("mnist", tmp_path)
  assert isinstance(info.value.__cause__, ConnectionError)


def test_load_tfds_names_missing_package(tmp_path, monkeypatch):
  def failing_source(name, *, split, data_dir, download):
    if download:
      raise ModuleNotFoundError("No module named 'importlib_resources'",
                                name="importlib_resources")
    raise NotImplementedError("not prepared")

  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: True)
  monkeypatch.setattr(tfds, "data_source", failing_source)
  with pytest.raises(data.DataError, match="pip install importlib_resources"):
    data.load_tfds("mnist", tmp_path)


def test_network_probe_is_bounded_and_offline_safe():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    assert data._network_reachable(("127.0.0.1", port), timeout=2.0)
  # The port is closed now: refused at once.
  start = time.monotonic()
  assert not data._network_reachable(("127.0.0.1", port), timeout=2.0)
  assert time.monotonic() - start < 4


# --------------------------------------------------------------------- batches


def _toy(n=37, h=6, w=5, c=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
  labels = np.arange(n, dtype=np.int32)  # label = example id, to track order
  return images, data.from_arrays(images, labels)


def _epoch(examples, batch_size, **kwargs):
  with data.prefetch(data.epoch_batches(examples, batch_size, **kwargs)) as it:
    return list(it)


@pytest.mark.parametrize("n,b,drop,expected", [(37, 8, True, 4), (37, 8, False, 5),
                                               (32, 8, True, 4), (32, 8, False, 4),
                                               (0, 8, False, 0), (7, 8, True, 0)])
def test_steps_per_epoch(n, b, drop, expected):
  assert data.steps_per_epoch(n, b, drop) == expected


def test_batches_shapes_dtypes_and_range():
  images, examples = _toy()
  batches = _epoch(examples, 8, seed=0, epoch=0)
  assert len(batches) == 4 and set(batches[0]) == {"image", "label"}
  for batch in batches:
    assert batch["image"].shape == (8, 6, 5, 2) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["image"] * 255, images[batch["label"]])
  seen = np.concatenate([b["label"] for b in batches])
  assert len(set(seen)) == 32  # no example twice in an epoch


def test_batches_deterministic_per_seed_epoch_and_vary_across_epochs():
  _, examples = _toy()
  order = lambda seed, epoch: np.concatenate(
      [b["label"] for b in _epoch(examples, 8, seed=seed, epoch=epoch)])
  np.testing.assert_array_equal(order(1, 2), order(1, 2))
  assert not np.array_equal(order(1, 2), order(1, 3))
  assert not np.array_equal(order(1, 2), order(2, 2))
  unshuffled = data.epoch_batches(examples, 8, seed=1, epoch=2, shuffle=False)
  np.testing.assert_array_equal(unshuffled[0]["label"], np.arange(8))


@pytest.mark.parametrize("augment", [None, "cifar"])
def test_batch_k_is_a_pure_function_of_seed_epoch_and_k(augment):
  images, _ = _toy(n=50, h=8, w=8, c=3)
  kwargs = dict(seed=7, epoch=3, augment=augment)
  # Fresh sources and pipelines each time: nothing is carried between them.
  batch = lambda k, start=0: data.epoch_batches(
      data.from_arrays(images.copy(), np.arange(50)), 8, start_batch=start, **kwargs)[k - start]
  full = _epoch(data.from_arrays(images, np.arange(50)), 8, **kwargs)
  assert len(full) == 6
  for k in (5, 0, 3):
    for start in range(k + 1):
      np.testing.assert_array_equal(batch(k, start)["image"], full[k]["image"])
      np.testing.assert_array_equal(batch(k, start)["label"], full[k]["label"])


@pytest.mark.parametrize("augment", [None, "cifar"])
def test_resume_from_start_batch_equals_tail_of_full_epoch(augment):
  _, examples = _toy(n=50, h=8, w=8, c=3)
  kwargs = dict(seed=7, epoch=3, augment=augment)
  full = _epoch(examples, 8, **kwargs)
  for start in (0, 2, 5, 6):
    resumed = _epoch(examples, 8, start_batch=start, **kwargs)
    assert len(resumed) == len(full) - start
    for got, want in zip(resumed, full[start:]):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_bad_start_batch_and_arguments_fail_eagerly():
  images, examples = _toy()
  with pytest.raises(data.DataError, match="start_batch=5"):
    data.epoch_batches(examples, 8, seed=0, epoch=0, start_batch=5)
  with pytest.raises(data.DataError, match="augment='mixup'"):
    data.epoch_batches(examples, 8, seed=0, epoch=0, augment="mixup")
  with pytest.raises(data.DataError, match="from_arrays"):
    data.epoch_batches(images, 8, seed=0, epoch=0)
  with pytest.raises(data.DataError, match="images"):
    data.from_arrays(images, np.arange(len(images) - 1))


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("augment", [None, "cifar"])
def test_process_slices_are_disjoint_and_union_is_global_batch(drop, augment):
  _, examples = _toy(n=45, h=8, w=8, c=3)
  kwargs = dict(seed=5, epoch=1, drop_remainder=drop, augment=augment)
  global_batches = _epoch(examples, 12, **kwargs)
  per_process = [_epoch(examples, 12, process_index=p, process_count=3, **kwargs)
                 for p in range(3)]
  assert all(len(batches) == len(global_batches) for batches in per_process)
  for step, want in enumerate(global_batches):
    parts = [batches[step] for batches in per_process]
    for part in parts:
      assert part["label"].shape == (4,)
    got = {k: np.concatenate([part[k] for part in parts]) for k in want}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
    real = got["label"][got["mask"]] if not drop else got["label"]
    assert len(set(real.tolist())) == len(real)  # slices are disjoint


def test_global_batch_must_divide_by_process_count():
  _, examples = _toy()
  with pytest.raises(data.DataError, match=r"batch_size=10.*process_count=4"):
    data.epoch_batches(examples, 10, seed=0, epoch=0, process_index=0, process_count=4)


def test_eval_padding_mask_counts_every_example_once():
  _, examples = _toy(n=37)
  batches = _epoch(examples, 8, seed=0, epoch=0, shuffle=False, drop_remainder=False)
  assert len(batches) == 5
  for batch in batches:
    assert batch["image"].shape == (8, 6, 5, 2) and batch["mask"].dtype == bool
  assert batches[0]["mask"].all()
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [True] * 5 + [False] * 3)
  assert not last["image"][~last["mask"]].any() and not last["label"][~last["mask"]].any()
  real = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(real, np.arange(37))


def test_empty_split_yields_no_batches():
  examples = data.from_arrays(np.zeros((0, 4, 4, 1), np.uint8), np.zeros((0,), np.int32))
  assert not _epoch(examples, 4, seed=0, epoch=0, drop_remainder=False)


# ----------------------------------------------------------------- augmentation


def test_cifar_augmentation_shape_range_determinism_and_effect():
  _, examples = _toy(n=64, h=32, w=32, c=3)
  run = lambda epoch: _epoch(examples, 16, seed=0, epoch=epoch, augment="cifar")
  a, b = run(0), run(0)
  plain = _epoch(examples, 16, seed=0, epoch=0)
  for x, y, p in zip(a, b, plain):
    assert x["image"].shape == (16, 32, 32, 3) and x["image"].dtype == np.float32
    assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], p["label"])  # same examples, same order
    assert not np.array_equal(x["image"], p["image"])
  assert not np.array_equal(a[0]["image"], run(1)[0]["image"])


def test_crop_flip_matches_per_example_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 7, 9, 2), dtype=np.uint8)
  dy, dx, flips = data.crop_flip_params(np.random.default_rng(1), 10, padding=3)
  got = data.apply_crop_flip(images, dy, dx, flips, padding=3)
  for i in range(10):
    padded = np.pad(images[i], ((3, 3), (3, 3), (0, 0)))
    want = padded[dy[i]:dy[i] + 7, dx[i]:dx[i] + 9]
    np.testing.assert_array_equal(got[i], want[:, ::-1] if flips[i] else want)
  assert dy.min() >= 0 and dy.max() <= 6 and flips.any() and not flips.all()
  identity = data.apply_crop_flip(images, np.full(10, 3), np.full(10, 3), np.zeros(10, bool), 3)
  np.testing.assert_array_equal(identity, images)
  again = data.random_crop_flip(images, np.random.default_rng(1), padding=3)
  np.testing.assert_array_equal(again, got)


# -------------------------------------------------------------------- prefetch


class _CountingSource(data.ArraySource):
  """Arrays that record which positions were read, and can fail at one of them."""

  def __init__(self, n, fail_at=None):
    super().__init__(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n), num_classes=n)
    self.fail_at, self.read_positions = fail_at, []

  def read(self, positions):
    if self.fail_at in positions:
      raise RuntimeError("disk on fire")
    self.read_positions.extend(positions.tolist())
    return super().read(positions)


def _counting_examples(n, fail_at=None):
  source = _CountingSource(n, fail_at)
  return source, data.Examples(source, grain.MapDataset.range(n))


def test_prefetch_yields_the_batches_in_order():
  _, examples = _toy()
  batches = data.epoch_batches(examples, 8, seed=0, epoch=0)
  with data.prefetch(batches, size=2) as it:
    got = list(it)
  assert len(got) == len(batches) == 4
  for k, g in enumerate(got):
    np.testing.assert_array_equal(g["label"], batches[k]["label"])


def test_prefetch_runs_ahead_and_stops_when_left():
  source, examples = _counting_examples(64)
  batches = data.epoch_batches(examples, 4, seed=0, epoch=0, shuffle=False)
  with data.prefetch(batches, size=3) as it:
    first = next(it)
    deadline = time.monotonic() + 10
    while len(source.read_positions) < 12 and time.monotonic() < deadline:  # 3 batches ahead
      time.sleep(0.01)
    assert len(source.read_positions) >= 12
  np.testing.assert_array_equal(first["label"], np.arange(4))
  with pytest.raises(ValueError, match="closed"):
    next(it)
  time.sleep(0.2)
  assert len(source.read_positions) < 64  # left early: the rest was never read


def test_prefetch_reraises_a_read_error():
  _, examples = _counting_examples(16, fail_at=9)
  batches = data.epoch_batches(examples, 4, seed=0, epoch=0, shuffle=False)
  with data.prefetch(batches, size=2) as it:
    assert next(it)["label"].tolist() == [0, 1, 2, 3]
    assert next(it)["label"].tolist() == [4, 5, 6, 7]
    with pytest.raises(RuntimeError, match="disk on fire"):
      next(it)
