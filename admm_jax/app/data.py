"""Datasets as random-access sources, and deterministic, resumable host batches from grain.

Sources are read on demand, never materialised: MNIST-format IDX files in a local
folder (mnist, fashion_mnist; held as the uint8 arrays they decode to), or
`tfds.data_source` for any TFDS image classification dataset with `image` and `label`
features (array_record files, one example decoded per read). `tfds.load` is never
used: it needs TensorFlow, which this project does not install.

A split is `Examples`: a source and a lazy grain dataset of positions in it. The
hold-out, the subsets, the per-epoch shuffle, the process slices and the batching
are grain transformations of those positions; a batch of positions is then read
from the source in one step (a gather for arrays) and augmented as a grain random
map. Memory does not grow with the dataset: nothing of size N is ever built.

Every random choice is a pure function of plain integers, so a run resumed at
(epoch, batch) sees exactly the batches an uninterrupted run would have seen:

  - validation hold-out and `limit_train`: seed
  - the order of an epoch: (seed, epoch)
  - CIFAR crop/flip of a batch: (seed, epoch, batch index)

grain takes 32-bit seeds; each is drawn from `np.random.SeedSequence([stream, ...])`
with a distinct, nonzero stream tag first and a fixed length per purpose, because
SeedSequence pads entropy with zeros: `[a, b]` and `[a, b, 0]` give the same state.

Size: one module because the sources, the hold-out and the batches share the seeding streams
above and the `Examples` type; split them and the streams' uniqueness is no longer checkable
in one place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import gzip
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from admm_jax.app.errors import UserError

SUPPORTED_LOCAL = ("mnist", "fashion_mnist")
_IDX_NUM_CLASSES = 10

# The four files of an MNIST-format folder, by split; each may also end in ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Stream tags for the seeds; see the module docstring.
_STREAM_SHUFFLE = 1
_STREAM_AUGMENT = 2
_STREAM_SPLIT = 3
_STREAM_LIMIT_TEST = 4

# A host TFDS downloads from; probed before a download so that an offline machine
# fails in seconds (tfds 4.9.10 retries 10 times with backoff: ~200 s offline).
_PROBE_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0

Split = tuple[np.ndarray, np.ndarray]
Example = dict[str, np.ndarray]


class DataError(UserError, ValueError):
  """A dataset cannot be found, read or batched as asked; the message says the fix."""


def _seed32(*ints: int) -> int:
  """A grain seed (0 <= s < 2**32) that depends only on `ints`."""
  return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


# --------------------------------------------------------------------------- IDX


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (the MNIST format), plain or gzip'd.

  Args:
    path: file path; gzip is detected from the content, not the name.

  Returns:
    A writable uint8 array with the shape stored in the header, e.g. (N, 28, 28)
    for images or (N,) for labels.

  Raises:
    DataError (a ValueError) naming the file when it is missing, is not an IDX
    file of type uint8 (magic 0x00 0x00 0x08 ndim), or is truncated / too long.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic
      data = gzip.decompress(data)
  except FileNotFoundError as e:
    raise DataError(f"IDX file {path!r} does not exist.") from e
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"IDX file {path!r} is not a readable (gzip'd) IDX file: {e}.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
    raise DataError(f"IDX file {path!r} is corrupt: header {data[:4].hex()!r} is not "
                    "an IDX magic for uint8 data (00 00 08 <ndim>).")
  ndim = data[3]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DataError(f"IDX file {path!r} is corrupt: it ends inside the header.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = offset + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected:
    raise DataError(f"IDX file {path!r} is corrupt: header shape {shape} needs "
                    f"{expected} bytes but the file has {len(data)}.")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy()


def _find_idx(data_dir: str, stem: str) -> str | None:
  for candidate in (stem + ".gz", stem):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  return None


def _idx_folder_text() -> str:
  files = ", ".join(f + ".gz" for pair in IDX_FILES.values() for f in pair)
  return f"a folder with MNIST-format IDX files ({files}; plain or .gz)"


def _idx_hint() -> str:
  return f"point data.dir at {_idx_folder_text()}, or set data.dir='' to use TFDS"


def load_local(name: str, data_dir: str | os.PathLike[str]) -> dict[str, Split]:
  """Loads MNIST or Fashion-MNIST from the four IDX files in `data_dir`.

  Args:
    name: "mnist" or "fashion_mnist" (both use the same file names).
    data_dir: folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
      t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].

  Returns:
    {"train": (images, labels), "test": (images, labels)} with images uint8
    (N, 28, 28, 1) and labels int32 (N,).

  Raises:
    DataError: unknown name, missing folder or file, corrupt file, or images and
      labels that disagree.
  """
  if name not in SUPPORTED_LOCAL:
    raise DataError(f"data.name {name!r} has no local IDX loader: use one of "
                    f"{SUPPORTED_LOCAL}, or set data.dir='' to use TFDS.")
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f"data.dir {data_dir!r} does not exist: {_idx_hint()}.")
  paths = {stem: _find_idx(data_dir, stem) for pair in IDX_FILES.values() for stem in pair}
  missing = [stem for stem, path in paths.items() if path is None]
  if missing:
    raise DataError(f"data.dir {data_dir!r} lacks {', '.join(missing)} (plain or .gz): "
                    f"{_idx_hint()}.")
  splits = {}
  for split, (image_stem, label_stem) in IDX_FILES.items():
    images, labels = load_idx(paths[image_stem]), load_idx(paths[label_stem])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise DataError(f"IDX files {paths[image_stem]!r} {images.shape} and "
                      f"{paths[label_stem]!r} {labels.shape} do not form one split: "
                      "expected (N, H, W) images and (N,) labels.")
    if labels.size and labels.max() >= _IDX_NUM_CLASSES:
      raise DataError(f"IDX file {paths[label_stem]!r} has label {labels.max()}, outside "
                      f"0..{_IDX_NUM_CLASSES - 1}.")
    splits[split] = (images[..., None], labels.astype(np.int32))
  return splits


# ----------------------------------------------------------------------- sources
#
# A source is random access in grain's sense (`len`, `[i]` -> example) and also reads
# a batch of positions at once, `read(positions) -> (images, labels)`, so that batches
# are gathered in one step instead of one grain element per example.


class ArraySource:
  """Examples held in memory as arrays (the decoded IDX files, or any arrays).

  Attributes:
    image_shape: (H, W, C).
    num_classes: labels are in 0..num_classes-1.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
      raise DataError(f"images {images.shape} and labels {labels.shape} must be (N, H, W, C) "
                      "and (N,) with the same N.")
    self._images, self._labels = images, labels.astype(np.int32)
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Example:
    return {"image": self._images[index], "label": self._labels[index]}

  def read(self, positions: np.ndarray) -> Split:
    """(images (B, H, W, C), int32 labels (B,)) at `positions`, fresh arrays."""
    return self._images[positions], self._labels[positions]


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """The examples of one split: which positions of a source belong to it, in which order.

  The positions are a lazy grain dataset of ints (a seeded shuffle and a slice of a
  range, say), so selecting a subset of a huge source costs no memory.

  Attributes:
    source: an ArraySource or TfdsSource.
    positions: grain.MapDataset of ints, positions in `source`.
  """
  source: ArraySource | TfdsSource
  positions: grain.MapDataset

  # No `[i]`: before grain a split was an (images, labels) tuple, and `split[1]` must
  # not quietly mean an example now. Read with `arrays()` or `epoch_batches`.

  def __len__(self) -> int:
    return len(self.positions)

  def arrays(self) -> Split:
    """Reads the whole split into (uint8 images (N, H, W, C), int32 labels (N,)).

    This materialises the split: for tests and small data, not for training.
    """
    return self.source.read(np.array([self.positions[i] for i in range(len(self))], np.int64))


def from_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int = 0) -> Examples:
  """All examples of (images (N, H, W, C) uint8, labels (N,)) arrays, in order.

  Raises:
    DataError: shapes that do not form one split.
  """
  source = ArraySource(images, labels, num_classes or int(np.max(labels, initial=-1)) + 1)
  return Examples(source, grain.MapDataset.range(len(source)))


# -------------------------------------------------------------------------- TFDS


def _network_reachable(address: tuple[str, int] = _PROBE_HOST,
                       timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """True when a TCP connection to `address` opens within `timeout` seconds."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True  # behind a proxy a direct probe proves nothing; let TFDS try
  result = []

  def probe():
    try:
      socket.create_connection(address, timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  # A thread bounds the DNS lookup too, which socket timeouts do not cover.
  thread = threading.Thread(target=probe, daemon=True, name="tfds-network-probe")
  thread.start()
  thread.join(timeout + 1.0)
  return bool(result and result[0])


def _tfds_error(name: str, cause: str) -> DataError:
  if name in SUPPORTED_LOCAL:
    way_out = ("give this machine network access so TFDS can download it, or set data.dir "
               f"to {_idx_folder_text()}")
  else:
    way_out = ("give this machine network access so TFDS can download it, or pass a TFDS "
               "data_dir holding a copy prepared with file_format='array_record'")
  return DataError(f"TFDS cannot provide dataset {name!r} ({cause}): {way_out}.")


def _short(e: BaseException) -> str:
  """Type and first sentence of an exception, for one-line messages."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(". ")[0].rstrip(".")[:200]
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class TfdsSource:
  """Examples of a `tfds.data_source`, decoded one record at a time when read.

  One at a time, also in `read`: the source's batched `__getitems__` is broken under
  tfds.testing.mock_data.

  Attributes:
    image_shape: (H, W, C), from the dataset's info.
    num_classes: from the dataset's info.
  """

  def __init__(self, source: Any, image_shape: tuple[int, int, int], num_classes: int):
    self._source, self.image_shape, self.num_classes = source, image_shape, num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    record = self._source[int(index)]
    return {"image": np.asarray(record["image"]), "label": np.int32(record["label"])}

  def read(self, positions: np.ndarray) -> Split:
    """(uint8 images (B, H, W, C), int32 labels (B,)) at `positions`."""
    images = np.empty((len(positions), *self.image_shape), np.uint8)
    labels = np.empty((len(positions),), np.int32)
    for i, position in enumerate(positions):
      example = self[position]
      images[i], labels[i] = example["image"], example["label"]
    return images, labels


def _check_tfds_name(tfds: Any, name: str) -> None:
  """Fails in a sentence when TFDS has no dataset called `name` (no network needed)."""
  base = name.split(":")[0].split("/")[0]
  try:
    tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    names = sorted(set(tfds.list_builders(with_community_datasets=False)))
    close = difflib.get_close_matches(base, names, n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise DataError(f"data.name {name!r} is neither a local IDX dataset {SUPPORTED_LOCAL} nor "
                    f"a TFDS dataset{hint}: use a name from tfds.list_builders().") from None


def _check_image_classification(tfds: Any, name: str, features: Any
                                ) -> tuple[tuple[int, int, int], int]:
  """(image shape, number of classes) of a TFDS dataset with fixed-size uint8 images."""
  keys = sorted(features.keys())
  if ("image" not in keys or "label" not in keys
      or not isinstance(features["label"], tfds.features.ClassLabel)):
    raise DataError(f"TFDS dataset {name!r} is not an image classification dataset: admm_jax "
                    f"needs an 'image' and a ClassLabel 'label' feature, it has {keys}.")
  image = features["image"]
  shape, dtype = tuple(image.shape), np.dtype(image.np_dtype)
  if len(shape) != 3 or None in shape or dtype != np.uint8:
    raise DataError(f"TFDS dataset {name!r} has {dtype} images of shape {shape}: admm_jax "
                    "batches fixed-size uint8 (H, W, C) images only.")
  return tuple(int(d) for d in shape), int(features["label"].num_classes)


def load_tfds(name: str, data_dir: str | os.PathLike[str] | None = None, *,
              download: bool = True) -> dict[str, TfdsSource]:
  """Opens a TFDS image classification dataset through `tfds.data_source` (no TensorFlow).

  Nothing is read here but the dataset's metadata: the sources read the array_record
  files one example at a time when indexed. Already prepared data in `data_dir` is
  read without any network. Otherwise, when `download` is true, a short probe checks
  that the network is reachable before TFDS downloads (offline, TFDS itself would
  retry for minutes).

  Args:
    name: any TFDS dataset with a fixed-size uint8 `image` feature and a ClassLabel
      `label` feature, e.g. "mnist", "cifar10", "cifar100", "svhn_cropped".
    data_dir: TFDS data folder; None means TFDS's default (TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    download: allow TFDS to download and prepare the data when it is missing.

  Returns:
    {"train": TfdsSource, "test": TfdsSource}, with `image_shape` and `num_classes`
    from the dataset's info. Under `tfds.testing.mock_data` both splits hold the
    same random examples (the mock ignores split names and slicing).

  Raises:
    DataError: unknown name, not an image classification dataset, or TFDS cannot get
      the data (offline, not prepared, a missing package); the message names the
      dataset and the ways out.
  """
  import tensorflow_datasets as tfds  # lazy: ~0.5 s, and only this path needs it

  _check_tfds_name(tfds, name)
  data_dir = None if data_dir in (None, "") else os.fspath(data_dir)
  splits = ("train", "test")

  def sources(download_now: bool) -> list[Any]:
    return [tfds.data_source(name, split=s, data_dir=data_dir, download=download_now)
            for s in splits]

  try:
    found = sources(False)
  except Exception as first:  # tfds raises many types here (NotImplementedError, ...)
    where = data_dir or "the default TFDS data_dir"
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except  # only used to word the message
      prepared = False
    # Unprepared, tfds says "file format TFRECORD is not supported": word it plainly.
    local = (f"the copy in {where} cannot be read ({_short(first)})" if prepared
             else f"no prepared copy in {where}")
    if prepared or not download:
      raise _tfds_error(name, local + ("" if download else ", download=False")) from first
    if not _network_reachable():
      raise _tfds_error(name, f"{local} and no network: {_PROBE_HOST[0]}:{_PROBE_HOST[1]} "
                        "is unreachable") from first
    try:
      found = sources(True)
    except ImportError as e:
      raise DataError(f"TFDS cannot download dataset {name!r} because a Python package is "
                      f"missing ({_short(e)}): pip install {e.name or 'it'}, or use a local "
                      "copy of the data.") from e
    except Exception as e:
      raise _tfds_error(name, f"download failed: {_short(e)}") from e
  image_shape, num_classes = _check_image_classification(tfds, name,
                                                         found[0].dataset_info.features)
  return {s: TfdsSource(src, image_shape, num_classes) for s, src in zip(splits, found)}


# ----------------------------------------------------------------------- Dataset


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One dataset, split three ways.

  Attributes:
    name: dataset name, e.g. "fashion_mnist".
    train, validation, test: Examples; `len()` counts them.
    num_classes: number of labels.
    image_shape: (H, W, C).
  """
  name: str
  train: Examples
  validation: Examples
  test: Examples
  num_classes: int
  image_shape: tuple[int, int, int]


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None, validation_size: int,
                 seed: int, *, limit_train: int = 0, limit_test: int = 0,
                 tfds_data_dir: str | None = None, download: bool = True,
                 validation_in_limit: bool = False) -> Dataset:
  """Opens a dataset and holds out a validation split from its training set.

  The hold-out and the subsets are index selections over the source (grain shuffles
  and slices of a range of positions): no example is read here.

  Args:
    name: "mnist" or "fashion_mnist" with `data_dir`; any TFDS image classification
      dataset (see `load_tfds`) without.
    data_dir: local IDX folder (mnist / fashion_mnist); empty or None uses TFDS.
    validation_size: examples moved from train to validation (0 = none).
    seed: fixes which examples are held out (and the `limit_train` subset): the
      first `validation_size` positions of a permutation seeded by `seed` alone are
      the validation split, the rest (or the next `limit_train`) the training split.
    limit_train: keep only this many training examples (0 = all), a random subset
      drawn from what remains after the hold-out; handy for tiny runs.
    limit_test: keep only this many test examples (0 = all), a fixed random subset
      that does not depend on `seed`, so runs with different seeds are scored on
      the same examples.
    tfds_data_dir: TFDS data folder when `data_dir` is empty (None = TFDS default).
    download: allow TFDS to download when the data is not prepared.
    validation_in_limit: with `limit_train`, carve the validation split out of it: the
      run sees `limit_train` labelled examples in all (`limit_train - validation_size`
      train), as a budget of N labelled examples means; else the validation split comes
      on top (N + validation_size labelled examples). The validation split is the same
      either way, and the carved training split is the first part of the uncarved one.

  Returns:
    A Dataset. The order of each split is fixed by `seed` (the test split's by
    nothing); training batches shuffle it again per epoch in `epoch_batches`.

  Raises:
    DataError: bad sizes, or the data cannot be opened.
  """
  for field, value in (("validation_size", validation_size), ("limit_train", limit_train),
                       ("limit_test", limit_test), ("seed", seed)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise DataError(f"data.{field}={value!r} must be a non-negative integer.")
  if data_dir:
    if name not in SUPPORTED_LOCAL:
      raise DataError(f"data.dir={os.fspath(data_dir)!r} holds IDX files, which exist only for "
                      f"{SUPPORTED_LOCAL}: set data.dir='' to load {name!r} from TFDS.")
    sources = {split: ArraySource(*arrays, _IDX_NUM_CLASSES)
               for split, arrays in load_local(name, data_dir).items()}
  else:
    sources = load_tfds(name, tfds_data_dir, download=download)

  train_source, test_source = sources["train"], sources["test"]
  n_train, n_test = len(train_source), len(test_source)
  if validation_size >= n_train:
    raise DataError(f"data.validation_size={validation_size} leaves no training examples: "
                    f"{name!r} has {n_train}; use a smaller value.")
  if validation_in_limit and limit_train and validation_size >= limit_train:
    raise DataError(f"data.validation_size={validation_size} leaves no training examples of "
                    f"data.limit_train={limit_train} (data.validation_in_limit=True carves "
                    "validation out of it): use a smaller validation_size or a larger limit.")
  held_out = grain.MapDataset.range(n_train).shuffle(seed=_seed32(_STREAM_SPLIT, seed))
  train = held_out[validation_size:]
  if limit_train:
    train = train[:limit_train - (validation_size if validation_in_limit else 0)]
  test = grain.MapDataset.range(n_test)
  if limit_test and limit_test < n_test:
    test = test.shuffle(seed=_seed32(_STREAM_LIMIT_TEST, 0))[:limit_test]
  return Dataset(name=name, train=Examples(train_source, train),
                 validation=Examples(train_source, held_out[:validation_size]),
                 test=Examples(test_source, test), num_classes=train_source.num_classes,
                 image_shape=train_source.image_shape)


# ---------------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches in one epoch: floor(n / b) when dropping the remainder, else ceil(n / b)."""
  if batch_size <= 0:
    raise DataError(f"batch_size={batch_size} must be positive.")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def crop_flip_params(rng: np.random.Generator, n: int, padding: int = 4
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws per-example crop offsets (dy, dx in [0, 2*padding]) and flip flags."""
  offsets = rng.integers(0, 2 * padding + 1, size=(2, n))
  flips = rng.random(n) < 0.5
  return offsets[0], offsets[1], flips


def apply_crop_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flips: np.ndarray,
                    padding: int = 4) -> np.ndarray:
  """Zero-pads by `padding`, crops back to (H, W) at (dy, dx), flips left-right where set.

  Vectorized over the batch with one gather. images: (B, H, W, C), any dtype.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = dy[:, None] + np.arange(h)                                  # (B, H)
  # A flip is a crop read right-to-left, so it folds into the column index.
  cols_fwd = np.arange(w)
  cols = dx[:, None] + np.where(flips[:, None], cols_fwd[::-1], cols_fwd)   # (B, W)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_flip(images: np.ndarray, rng: np.random.Generator,
                     padding: int = 4) -> np.ndarray:
  """CIFAR augmentation: random crop with `padding` zero pixels + random h-flip.

  Args:
    images: (B, H, W, C) batch.
    rng: numpy Generator; the result is a pure function of its state.
    padding: zero border width; crops keep the input size (32 for CIFAR).

  Returns:
    Augmented batch with the shape and dtype of `images`.
  """
  dy, dx, flips = crop_flip_params(rng, len(images), padding)
  return apply_crop_flip(images, dy, dx, flips, padding)


AUGMENTATIONS = ("cifar",)


def _read_batch(positions: np.ndarray, rng: np.random.Generator | None = None, *,
                source: ArraySource | TfdsSource, lo: int, hi: int,
                with_mask: bool) -> dict[str, np.ndarray]:
  """This process's slice [lo, hi) of a global batch of source positions (-1 = padding)."""
  local = positions[lo:hi]
  valid = local >= 0
  images, labels = source.read(np.where(valid, local, 0))
  if not valid.all():
    images[~valid], labels[~valid] = 0, 0
  if rng is not None:  # drawn for the global batch, so any process count sees the same
    dy, dx, flips = crop_flip_params(rng, len(positions))
    images = apply_crop_flip(images, dy[lo:hi], dx[lo:hi], flips[lo:hi])
  batch = {"image": images.astype(np.float32) / np.float32(255.0), "label": labels}
  if with_mask:
    batch["mask"] = valid
  return batch


def epoch_batches(examples: Examples, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_remainder: bool = True,
                  augment: str | None = None, start_batch: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """The batches of one epoch from `start_batch` on, as a lazy, random-access grain dataset.

  Element k is batch `start_batch + k` of the epoch, a pure function of (seed, epoch,
  its index): the order is a grain shuffle of the split's positions seeded by (seed,
  epoch) (or the split's own order when `shuffle` is false), and the crop/flip of a
  batch is a grain random map seeded by (seed, epoch) and the batch index. So a
  resumed run (`start_batch=k`) reads exactly the batches k, k+1, ... of the full
  epoch. Iterate it with `prefetch`; nothing is read until then.

  Multi-host: `batch_size` is the GLOBAL batch. Every process computes the same
  global batch of positions and reads only its contiguous slice
  [process_index * b_local, (process_index + 1) * b_local), b_local = batch_size //
  process_count. Augmentation is drawn for the whole global batch and then sliced,
  so the processes' slices, concatenated, are the one-process batch.

  Eval (`drop_remainder=False`): the last global batch is padded to `batch_size`
  with zero images and label 0, and every batch gets a boolean "mask" key (True
  for real examples), so a jitted eval step sees one shape and structure and can
  leave padding out of its counts: `sum(correct * mask) / sum(mask)`.

  Args:
    examples: a split of `load_dataset`, or `from_arrays(images, labels)`.
    batch_size: global batch size.
    seed, epoch: non-negative ints fixing the order and augmentation.
    shuffle: permute the examples (off for eval).
    drop_remainder: drop the last partial batch (training) or pad it with a mask.
    augment: None / "" / "none" for no augmentation, or "cifar" (random crop with
      4-pixel zero padding + horizontal flip).
    start_batch: first batch, in 0..steps_per_epoch (the latter gives no batches).
    process_index, process_count: this process and the number of processes.

  Returns:
    A grain.MapDataset of {"image": float32 (b_local, H, W, C) in [0, 1], "label":
    int32 (b_local,)} plus "mask": bool (b_local,) when `drop_remainder` is false.

  Raises:
    DataError: inconsistent arguments.
  """
  if not isinstance(examples, Examples):
    raise DataError(f"examples must be data.Examples, not {type(examples).__name__}: wrap "
                    "arrays with data.from_arrays(images, labels).")
  if batch_size <= 0:
    raise DataError(f"batch_size={batch_size} must be positive.")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must lie in [0, process_count="
                    f"{process_count}).")
  if batch_size % process_count:
    raise DataError(f"global batch_size={batch_size} is not divisible by process_count="
                    f"{process_count}: use a multiple of {process_count}.")
  if seed < 0 or epoch < 0:
    raise DataError(f"seed={seed} and epoch={epoch} must be non-negative.")
  if augment in ("", "none"):
    augment = None
  if augment is not None and augment not in AUGMENTATIONS:
    raise DataError(f"augment={augment!r} is unknown: use None or one of {AUGMENTATIONS}.")
  n = len(examples)
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if not 0 <= start_batch <= steps:
    raise DataError(f"start_batch={start_batch} is outside 0..{steps}, the batches in this "
                    f"epoch of {n} examples at batch_size={batch_size}.")

  positions = examples.positions
  if shuffle:
    positions = positions.shuffle(seed=_seed32(_STREAM_SHUFFLE, seed, epoch))
  positions = positions[:steps * batch_size]
  if steps * batch_size > n:  # pad the last eval batch with position -1
    padding = grain.MapDataset.range(steps * batch_size - n).map(lambda _: -1)
    positions = grain.MapDataset.concatenate([positions, padding])
  local = batch_size // process_count
  read = functools.partial(_read_batch, source=examples.source, lo=process_index * local,
                           hi=(process_index + 1) * local, with_mask=not drop_remainder)
  global_batches = positions.batch(batch_size)
  if augment == "cifar":
    batches = global_batches.random_map(read, seed=_seed32(_STREAM_AUGMENT, seed, epoch))
  else:
    batches = global_batches.map(read)
  return batches[start_batch:]


@contextlib.contextmanager
def prefetch(batches: grain.MapDataset, size: int = 2) -> Iterator[grain.DatasetIterator]:
  """Iterates `batches` in order while grain's reader threads prepare `size` ahead.

  Usage: `with prefetch(epoch_batches(...), size=3) as it: for batch in it: ...`.
  Leaving the block stops the readers, also when it is left early.

  Args:
    batches: a grain.MapDataset, e.g. `epoch_batches(...)`.
    size: batches read ahead (and reader threads).

  Yields:
    A grain iterator over the elements of `batches`, in order; exceptions raised
    while reading come out of its `next()`.
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be at least 1.")
  iterator = iter(batches.to_iter_dataset(
      grain.ReadOptions(num_threads=size, prefetch_buffer_size=size)))
  try:
    yield iterator
  finally:
    iterator.close()
