"""Datasets as numpy arrays, and deterministic, resumable host batches.

Sources: MNIST-format IDX files in a local folder (mnist, fashion_mnist) or
`tfds.data_source` (mnist, fashion_mnist, cifar10). `tfds.load` is never used: it
needs TensorFlow, which this project does not install.

Every random choice here is a pure function of plain integers, so a run resumed at
(epoch, batch) sees exactly the batches an uninterrupted run would have seen:

  - validation hold-out and `limit_train`: seed
  - the order of an epoch: (seed, epoch)
  - CIFAR crop/flip of a batch: (seed, epoch, batch index)

Generators are seeded with `np.random.default_rng([stream, ...])` with a distinct,
nonzero stream tag first and a fixed length per purpose, because numpy's
SeedSequence pads entropy with zeros: `[a, b]` and `[a, b, 0]` give the same stream.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

SUPPORTED_LOCAL = ("mnist", "fashion_mnist")
SUPPORTED_TFDS = ("mnist", "fashion_mnist", "cifar10")
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

# The four files of an MNIST-format folder, by split; each may also end in ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Stream tags for np.random.default_rng([tag, ...]); see the module docstring.
_STREAM_SHUFFLE = 1
_STREAM_AUGMENT = 2
_STREAM_SPLIT = 3
_STREAM_LIMIT_TEST = 4

# A host TFDS downloads from; probed before a download so that an offline machine
# fails in seconds (tfds 4.9.10 retries 10 times with backoff: ~200 s offline).
_PROBE_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0

Split = tuple[np.ndarray, np.ndarray]


class DataError(ValueError):
  """A dataset cannot be found, read or batched as asked; the message says the fix."""


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
    if labels.size and labels.max() >= NUM_CLASSES[name]:
      raise DataError(f"IDX file {paths[label_stem]!r} has label {labels.max()}, outside "
                      f"0..{NUM_CLASSES[name] - 1}.")
    splits[split] = (images[..., None], labels.astype(np.int32))
  return splits


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


def _source_to_arrays(source: Any, name: str) -> Split:
  """Copies a TFDS random-access source into (uint8 images, int32 labels)."""
  n = len(source)
  shape = IMAGE_SHAPES[name]
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int32)
  # One record at a time: `__getitems__` is broken under tfds.testing.mock_data.
  for i in range(n):
    record = source[i]
    images[i] = record["image"]
    labels[i] = record["label"]
  return images, labels


def load_tfds(name: str, data_dir: str | os.PathLike[str] | None = None, *,
              download: bool = True) -> dict[str, Split]:
  """Loads a dataset through `tfds.data_source` (no TensorFlow needed).

  Already prepared array_record data in `data_dir` is read without any network.
  Otherwise, when `download` is true, a short probe checks that the network is
  reachable before TFDS downloads (offline, TFDS itself would retry for minutes).

  Args:
    name: "mnist", "fashion_mnist" or "cifar10".
    data_dir: TFDS data folder; None means TFDS's default (TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    download: allow TFDS to download and prepare the data when it is missing.

  Returns:
    {"train": (images, labels), "test": (images, labels)}: images uint8 (N, H, W, C),
    labels int32 (N,). Under `tfds.testing.mock_data` both splits hold the same
    random examples (the mock ignores split names and slicing).

  Raises:
    DataError: unknown name, or TFDS cannot get the data (offline, not prepared,
      a missing package); the message names the dataset and the ways out.
  """
  if name not in SUPPORTED_TFDS:
    raise DataError(f"data.name {name!r} is not supported: use one of {SUPPORTED_TFDS}.")
  import tensorflow_datasets as tfds  # lazy: ~0.5 s, and only this path needs it

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
  return {s: _source_to_arrays(src, name) for s, src in zip(splits, found)}


# ----------------------------------------------------------------------- Dataset


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Arrays of one dataset, split three ways.

  Attributes:
    name: dataset name, e.g. "fashion_mnist".
    train, validation, test: (images uint8 (N, H, W, C), labels int32 (N,)).
    num_classes: number of labels.
    image_shape: (H, W, C).
  """
  name: str
  train: Split
  validation: Split
  test: Split
  num_classes: int
  image_shape: tuple[int, int, int]


def _take(split: Split, idx: np.ndarray) -> Split:
  return split[0][idx], split[1][idx]


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None, validation_size: int,
                 seed: int, *, limit_train: int = 0, limit_test: int = 0,
                 tfds_data_dir: str | None = None, download: bool = True) -> Dataset:
  """Loads a dataset and holds out a validation split from its training set.

  Args:
    name: "mnist", "fashion_mnist" or "cifar10".
    data_dir: local IDX folder (mnist / fashion_mnist); empty or None uses TFDS.
    validation_size: examples moved from train to validation (0 = none).
    seed: fixes which examples are held out (and the `limit_train` subset).
    limit_train: keep only this many training examples (0 = all), a random subset
      drawn from what remains after the hold-out; handy for tiny runs.
    limit_test: keep only this many test examples (0 = all), a fixed random subset
      that does not depend on `seed`, so runs with different seeds are scored on
      the same examples.
    tfds_data_dir: TFDS data folder when `data_dir` is empty (None = TFDS default).
    download: allow TFDS to download when the data is not prepared.

  Returns:
    A Dataset. Each split keeps the source order of its examples (subsets are
    sorted), so the only shuffling is the per-epoch one in `epoch_batches`.

  Raises:
    DataError: bad sizes, or the data cannot be loaded.
  """
  if name not in SUPPORTED_TFDS:
    raise DataError(f"data.name {name!r} is not supported: use one of {SUPPORTED_TFDS}.")
  for field, value in (("validation_size", validation_size), ("limit_train", limit_train),
                       ("limit_test", limit_test), ("seed", seed)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise DataError(f"data.{field}={value!r} must be a non-negative integer.")
  if data_dir:
    if name not in SUPPORTED_LOCAL:
      raise DataError(f"data.dir={os.fspath(data_dir)!r} holds IDX files, which exist only for "
                      f"{SUPPORTED_LOCAL}: set data.dir='' to load {name!r} from TFDS.")
    splits = load_local(name, data_dir)
  else:
    splits = load_tfds(name, tfds_data_dir, download=download)

  train, test = splits["train"], splits["test"]
  n_train = len(train[1])
  if validation_size >= n_train:
    raise DataError(f"data.validation_size={validation_size} leaves no training examples: "
                    f"{name!r} has {n_train}; use a smaller value.")
  perm = np.random.default_rng([_STREAM_SPLIT, seed]).permutation(n_train)
  val_idx = np.sort(perm[:validation_size])
  train_idx = perm[validation_size:]
  if limit_train:
    train_idx = train_idx[:limit_train]
  train_idx = np.sort(train_idx)
  if limit_test and limit_test < len(test[1]):
    test_perm = np.random.default_rng([_STREAM_LIMIT_TEST, 0]).permutation(len(test[1]))
    test = _take(test, np.sort(test_perm[:limit_test]))
  return Dataset(name=name, train=_take(train, train_idx), validation=_take(train, val_idx),
                 test=test, num_classes=NUM_CLASSES[name],
                 image_shape=tuple(int(d) for d in train[0].shape[1:]))


# ---------------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches in one epoch: floor(n / b) when dropping the remainder, else ceil(n / b)."""
  if batch_size <= 0:
    raise DataError(f"batch_size={batch_size} must be positive.")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng([_STREAM_SHUFFLE, seed, epoch]).permutation(num_examples)


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


def epoch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int,
                  epoch: int, shuffle: bool = True, drop_remainder: bool = True,
                  augment: str | None = None, start_batch: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Yields the batches of one epoch, resumable at any batch.

  The order is `epoch_order(n, seed, epoch)` (or source order when `shuffle` is
  false) and augmentation randomness depends only on (seed, epoch, batch index),
  so `start_batch=k` yields exactly the batches k, k+1, ... of the full epoch.

  Multi-host: `batch_size` is the GLOBAL batch. Every process computes the same
  global order and yields only its contiguous slice
  [process_index * b_local, (process_index + 1) * b_local) of each global batch,
  with b_local = batch_size // process_count. Augmentation is drawn for the whole
  global batch and then sliced, so the union over processes equals the
  single-process batch.

  Eval (`drop_remainder=False`): the last global batch is padded to `batch_size`
  with zero images and label 0, and every batch gets a boolean "mask" key (True
  for real examples), so a jitted eval step sees one shape and structure and can
  leave padding out of its counts: `sum(correct * mask) / sum(mask)`.

  Args:
    images: uint8 (N, H, W, C) in [0, 255].
    labels: int (N,).
    batch_size: global batch size.
    seed, epoch: non-negative ints fixing the order and augmentation.
    shuffle: permute the examples (off for eval).
    drop_remainder: drop the last partial batch (training) or pad it with a mask.
    augment: None / "" / "none" for no augmentation, or "cifar" (random crop with
      4-pixel zero padding + horizontal flip).
    start_batch: first batch to yield, in 0..steps_per_epoch (the latter yields nothing).
    process_index, process_count: this process and the number of processes.

  Yields:
    {"image": float32 (b_local, H, W, C) in [0, 1], "label": int32 (b_local,)}
    plus "mask": bool (b_local,) when `drop_remainder` is false.

  Raises:
    DataError: inconsistent arguments (checked before the first batch).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
    raise DataError(f"images {images.shape} and labels {labels.shape} must be (N, H, W, C) "
                    "and (N,) with the same N.")
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
  n = len(labels)
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if not 0 <= start_batch <= steps:
    raise DataError(f"start_batch={start_batch} is outside 0..{steps}, the batches in this "
                    f"epoch of {n} examples at batch_size={batch_size}.")
  # Validated eagerly above; the generator below only does the work.
  return _epoch_batches(images, labels, batch_size, seed, epoch, shuffle, drop_remainder,
                        augment, start_batch, steps, process_index, process_count)


def _epoch_batches(images, labels, batch_size, seed, epoch, shuffle, drop_remainder, augment,
                   start_batch, steps, process_index, process_count):
  n = len(labels)
  order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
  local = batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  for step in range(start_batch, steps):
    idx = order[step * batch_size:(step + 1) * batch_size]
    if len(idx) < batch_size:  # only when padding the last eval batch
      idx = np.concatenate([idx, np.full(batch_size - len(idx), -1, idx.dtype)])
    local_idx = idx[lo:hi]
    valid = local_idx >= 0
    safe = np.where(valid, local_idx, 0)
    x = images[safe]
    y = labels[safe].astype(np.int32)
    if not valid.all():
      x[~valid] = 0
      y[~valid] = 0
    if augment == "cifar":
      rng = np.random.default_rng([_STREAM_AUGMENT, seed, epoch, step])
      dy, dx, flips = crop_flip_params(rng, batch_size)   # drawn for the global batch
      x = apply_crop_flip(x, dy[lo:hi], dx[lo:hi], flips[lo:hi])
    batch = {"image": x.astype(np.float32) / np.float32(255.0), "label": y}
    if not drop_remainder:
      batch["mask"] = valid
    yield batch


# --------------------------------------------------------------------- prefetch

_ITEM, _END, _ERROR = "item", "end", "error"


def _offer(q: queue.Queue, stop: threading.Event, entry: tuple[str, Any]) -> bool:
  """Puts `entry` unless stopped; timed puts let close() free a producer on a full queue."""
  while not stop.is_set():
    try:
      q.put(entry, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(iterator: Iterator[Any], put: Callable[[Any], Any] | None, q: queue.Queue,
             stop: threading.Event) -> None:
  # A plain function, not a method: the thread must not keep the Prefetcher alive,
  # so that dropping the last reference stops it (see Prefetcher.__del__).
  try:
    for item in iterator:
      if put is not None:
        item = put(item)
      if not _offer(q, stop, (_ITEM, item)):
        return
    _offer(q, stop, (_END, None))
  except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
    _offer(q, stop, (_ERROR, e))


class Prefetcher(Iterator[Any]):
  """Iterator that produces items in a background thread into a bounded queue.

  Use `prefetch(...)` to make one. Exceptions raised by the producer are re-raised
  by `next()` in the consumer. `close()` (or leaving a `with` block, or dropping
  the last reference) stops the producer after its current item; it is a daemon
  thread, so a forgotten prefetcher never blocks interpreter exit.
  """

  def __init__(self, iterator: Iterable[Any], size: int, put: Callable[[Any], Any] | None):
    if size < 1:
      raise ValueError(f"prefetch size={size} must be at least 1.")
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=_produce,
                                    args=(iter(iterator), put, self._queue, self._stop),
                                    daemon=True, name="prefetch")
    self._thread.start()

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == _ITEM:
      return value
    self._done = True
    self._thread.join()
    if kind == _ERROR:
      raise value
    raise StopIteration

  def close(self, timeout: float | None = 5.0) -> None:
    """Stops the producer and waits up to `timeout` s for its current item to finish."""
    self._done = True
    self._stop.set()
    self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    """Whether the producer thread is still running."""
    return self._thread.is_alive()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __del__(self) -> None:
    stop = getattr(self, "_stop", None)  # absent if __init__ failed
    if stop is not None:
      stop.set()


def prefetch(iterator: Iterable[Any], size: int = 2,
             put: Callable[[Any], Any] | None = None) -> Prefetcher:
  """Runs `iterator` ahead in a background thread, keeping up to `size` items ready.

  Args:
    iterator: any iterable, e.g. `epoch_batches(...)`; it is consumed only by the
      background thread from now on.
    size: queue bound (items produced but not yet taken).
    put: optional function applied to each item in the thread, e.g.
      `jax.device_put` or a sharding-aware placement, so transfers overlap compute.

  Returns:
    A `Prefetcher`: iterate it like the original; `close()` it (or use `with`) when
    stopping early.
  """
  return Prefetcher(iterator, size, put)
