"""Tests for admm_jax.data: IDX/TFDS loading, deterministic batches, prefetch."""
import gzip
import os
import socket
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from admm_jax import data

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
  assert len(ds.train[1]) == 55000 and len(ds.validation[1]) == 5000
  assert len(ds.test[1]) == 10000
  assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)


# ----------------------------------------------------------------- load_dataset


def test_load_dataset_local_split_is_deterministic_and_disjoint(tmp_path):
  arrays = _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  a = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3)
  b = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=3)
  c = data.load_dataset("mnist", str(tmp_path), validation_size=20, seed=4)
  np.testing.assert_array_equal(a.validation[0], b.validation[0])
  np.testing.assert_array_equal(a.train[1], b.train[1])
  assert not np.array_equal(a.validation[0], c.validation[0])
  assert len(a.train[1]) == 80 and len(a.validation[1]) == 20
  assert not _rows(a.train[0]) & _rows(a.validation[0])
  assert _rows(a.train[0]) | _rows(a.validation[0]) == _rows(
      arrays["train-images-idx3-ubyte"][..., None])


def test_load_dataset_zero_validation_and_limits(tmp_path):
  _write_mnist_dir(tmp_path, n_train=100, n_test=30)
  ds = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=0,
                         limit_train=16, limit_test=8)
  assert ds.validation[0].shape == (0, 28, 28, 1) and ds.validation[1].shape == (0,)
  assert ds.train[0].shape == (16, 28, 28, 1) and ds.test[0].shape == (8, 28, 28, 1)
  again = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=0,
                            limit_train=16, limit_test=8)
  np.testing.assert_array_equal(ds.train[0], again.train[0])
  other_seed = data.load_dataset("mnist", str(tmp_path), validation_size=0, seed=1,
                                 limit_train=16, limit_test=8)
  np.testing.assert_array_equal(ds.test[0], other_seed.test[0])  # seed-independent test subset


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


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_tfds_under_mock(tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=40):
    splits = data.load_tfds(name, tmp_path)
  assert set(splits) == {"train", "test"}
  for images, labels in splits.values():
    assert images.shape == (40, *shape) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_dataset_tfds_holds_out_validation_disjointly(tmp_path, name):
  with tfds.testing.mock_data(num_examples=64):
    full = data.load_tfds(name, tmp_path)["train"]
    ds = data.load_dataset(name, "", validation_size=16, seed=0, tfds_data_dir=str(tmp_path))
  assert len(ds.train[1]) == 48 and len(ds.validation[1]) == 16 and len(ds.test[1]) == 64
  assert ds.image_shape == full[0].shape[1:] and ds.num_classes == 10
  assert not _rows(ds.train[0]) & _rows(ds.validation[0])
  assert _rows(ds.train[0]) | _rows(ds.validation[0]) == _rows(full[0])


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
  return images, labels


@pytest.mark.parametrize("n,b,drop,expected", [(37, 8, True, 4), (37, 8, False, 5),
                                               (32, 8, True, 4), (32, 8, False, 4),
                                               (0, 8, False, 0), (7, 8, True, 0)])
def test_steps_per_epoch(n, b, drop, expected):
  assert data.steps_per_epoch(n, b, drop) == expected


def test_batches_shapes_dtypes_and_range():
  images, labels = _toy()
  batches = list(data.epoch_batches(images, labels, 8, seed=0, epoch=0))
  assert len(batches) == 4 and set(batches[0]) == {"image", "label"}
  for batch in batches:
    assert batch["image"].shape == (8, 6, 5, 2) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["image"] * 255, images[batch["label"]])
  seen = np.concatenate([b["label"] for b in batches])
  assert len(set(seen)) == 32  # no example twice in an epoch


def test_batches_deterministic_per_seed_epoch_and_vary_across_epochs():
  images, labels = _toy()
  order = lambda seed, epoch: np.concatenate(
      [b["label"] for b in data.epoch_batches(images, labels, 8, seed=seed, epoch=epoch)])
  np.testing.assert_array_equal(order(1, 2), order(1, 2))
  assert not np.array_equal(order(1, 2), order(1, 3))
  assert not np.array_equal(order(1, 2), order(2, 2))
  unshuffled = data.epoch_batches(images, labels, 8, seed=1, epoch=2, shuffle=False)
  np.testing.assert_array_equal(next(unshuffled)["label"], np.arange(8))


@pytest.mark.parametrize("augment", [None, "cifar"])
def test_resume_from_start_batch_equals_tail_of_full_epoch(augment):
  images, labels = _toy(n=50, h=8, w=8, c=3)
  kwargs = dict(seed=7, epoch=3, augment=augment)
  full = list(data.epoch_batches(images, labels, 8, **kwargs))
  for start in (0, 2, 5, 6):
    resumed = list(data.epoch_batches(images, labels, 8, start_batch=start, **kwargs))
    assert len(resumed) == len(full) - start
    for got, want in zip(resumed, full[start:]):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_bad_start_batch_and_arguments_fail_eagerly():
  images, labels = _toy()
  with pytest.raises(data.DataError, match="start_batch=5"):
    data.epoch_batches(images, labels, 8, seed=0, epoch=0, start_batch=5)
  with pytest.raises(data.DataError, match="augment='mixup'"):
    data.epoch_batches(images, labels, 8, seed=0, epoch=0, augment="mixup")
  with pytest.raises(data.DataError, match="images"):
    data.epoch_batches(images, labels[:-1], 8, seed=0, epoch=0)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("augment", [None, "cifar"])
def test_process_slices_are_disjoint_and_union_is_global_batch(drop, augment):
  images, labels = _toy(n=45, h=8, w=8, c=3)
  kwargs = dict(seed=5, epoch=1, drop_remainder=drop, augment=augment)
  global_batches = list(data.epoch_batches(images, labels, 12, **kwargs))
  per_process = [list(data.epoch_batches(images, labels, 12, process_index=p,
                                         process_count=3, **kwargs)) for p in range(3)]
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
  images, labels = _toy()
  with pytest.raises(data.DataError, match=r"batch_size=10.*process_count=4"):
    data.epoch_batches(images, labels, 10, seed=0, epoch=0, process_index=0, process_count=4)


def test_eval_padding_mask_counts_every_example_once():
  images, labels = _toy(n=37)
  batches = list(data.epoch_batches(images, labels, 8, seed=0, epoch=0, shuffle=False,
                                    drop_remainder=False))
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
  images = np.zeros((0, 4, 4, 1), np.uint8)
  labels = np.zeros((0,), np.int32)
  assert not list(data.epoch_batches(images, labels, 4, seed=0, epoch=0, drop_remainder=False))


# ----------------------------------------------------------------- augmentation


def test_cifar_augmentation_shape_range_determinism_and_effect():
  images, labels = _toy(n=64, h=32, w=32, c=3)
  run = lambda epoch: list(data.epoch_batches(images, labels, 16, seed=0, epoch=epoch,
                                              augment="cifar"))
  a, b = run(0), run(0)
  plain = list(data.epoch_batches(images, labels, 16, seed=0, epoch=0))
  for x, y, p in zip(a, b, plain):
    assert x["image"].shape == (16, 32, 32, 3) and x["image"].dtype == np.float32
    assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], p["label"])  # same examples, same order
    assert not np.array_equal(x["image"], p["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])


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


# -------------------------------------------------------------------- prefetch


def test_prefetch_yields_same_sequence():
  images, labels = _toy()
  want = list(data.epoch_batches(images, labels, 8, seed=0, epoch=0))
  with data.prefetch(data.epoch_batches(images, labels, 8, seed=0, epoch=0), size=2) as it:
    got = list(it)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["label"], w["label"])
  assert list(data.prefetch(iter(range(100)), size=3)) == list(range(100))


def test_prefetch_applies_put_in_producer_thread():
  threads = []

  def put(x):
    threads.append(threading.current_thread().name)
    return x * 10

  assert list(data.prefetch(range(5), put=put)) == [0, 10, 20, 30, 40]
  assert set(threads) == {"prefetch"}


def test_prefetch_reraises_producer_exception():
  def producer():
    yield 1
    yield 2
    raise RuntimeError("disk on fire")

  it = data.prefetch(producer())
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_close_stops_an_endless_producer():
  def endless():
    i = 0
    while True:
      yield i
      i += 1

  it = data.prefetch(endless(), size=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  time.sleep(0.05)  # let the producer block on the full queue
  it.close()
  assert not it.alive
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_runs_ahead():
  produced = []

  def producer():
    for i in range(4):
      produced.append(i)
      yield i

  it = data.prefetch(producer(), size=2)
  deadline = time.monotonic() + 5
  while len(produced) < 3 and time.monotonic() < deadline:  # 2 queued + 1 waiting to enter
    time.sleep(0.01)
  assert len(produced) >= 3
  assert list(it) == [0, 1, 2, 3]


def test_prefetch_dropped_without_close_stops_its_thread():
  import gc

  def endless():
    while True:
      yield np.zeros(3)

  it = data.prefetch(endless(), size=1)
  next(it)
  thread = it._thread
  del it
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()
