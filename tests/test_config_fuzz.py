"""Every field of every shipped config (and variant), fuzzed: a wrong type, negative, zero,
huge, NaN and empty value each ends in one sentence naming the field, or is a value the
field really accepts (listed below, with the reason).

In-process: a wrong type is refused when ml_collections assigns it (the command line's flag
parser refuses the same text; a few of those run through main's parser here), everything
else by configlib.validate. One subprocess checks the command line's exit code 2.
"""
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from admm_jax import main  # noqa: F401  (defines the --config flag the parser reads)
from admm_jax.app import cli, configlib, data
from test_configs import CASES, _load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_FIELDS = ("momentum", "weight_decay", "warmup_epochs", "lr_drop_epochs")

# (kind, field) pairs that validate accepts on purpose. Fields of the stages are written
# with "*" for any stage.
ACCEPTED = {
    "zero": {"seed", "data.validation_size", "data.limit_train", "data.limit_test",  # 0 = none/all
             "attack.eps",                                    # natural training
             "attack.beta",                                   # trades/mart: no KL term
             "parallel.data_axis", "parallel.num_processes",  # 0 = all devices / detect
             "parallel.process_id", "scratch.epochs",         # process 0 / the others' total
             "inherited.epochs",                              # 0 = the others' total
             "*.momentum", "*.weight_decay", "*.warmup_epochs",
             "eval.final_limit", "eval.sanity_limit",             # all test examples / no checks
             "eval.select_limit"},                                # all validation examples
    "negative": {"parallel.process_id"},                      # -1 = detect
    "empty": {"*.lr_drop_epochs",                             # no drops
              "eval.final_attack"},                           # no evaluation after each stage
}
# Free-form strings checked where they are used: data.dir when the data loads (tested below),
# init_from when a stage needs another run's output, the others by TFDS / jax.distributed.
ANY_STRING = {"data.dir", "data.tfds_dir", "init_from", "parallel.coordinator_address"}


def _fields(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _bad_values(value):
  """{kind: value} for a field whose current value is `value`."""
  if isinstance(value, bool):
    return {"wrong_type": "abc", "negative": -1, "huge": 10**12, "nan": math.nan, "empty": ""}
  if isinstance(value, int):
    return {"wrong_type": "abc", "fraction": 1.5, "negative": -1, "zero": 0, "huge": 10**12,
            "nan": math.nan, "empty": ""}
  if isinstance(value, float):
    return {"wrong_type": "abc", "negative": -1.0, "zero": 0.0, "huge": 1e30, "nan": math.nan,
            "inf": math.inf, "empty": ""}
  if isinstance(value, str):
    return {"wrong_type": 123, "negative": "-1", "zero": "0", "huge": "x" * 5000, "nan": "nan",
            "empty": ""}
  assert isinstance(value, tuple), type(value)
  return {"wrong_type": "abc", "negative": (-1,), "zero": (0,), "huge": (10**12,),
          "nan": (math.nan,), "empty": ()}


def _get(config, field):
  for part in field.split("."):
    config = config[part]
  return config


def _set(config, field, value):
  *parents, leaf = field.split(".")
  for part in parents:
    config = config[part]
  config[leaf] = value


def _accepted(kind, field, config):
  stage, _, rest = field.partition(".")
  if field in ANY_STRING or f"*.{rest}" in ACCEPTED.get(kind, ()) and stage in \
      configlib.STAGE_ORDER or field in ACCEPTED.get(kind, ()):
    return True
  # Without data.dir, data.name is any TFDS name; TFDS refuses unknown ones when the data
  # loads (test_an_unknown_tfds_name_is_one_sentence_when_the_data_loads).
  return field == "data.name" and not config.data.dir and kind in ("huge", "nan")


def _failures(config, field, values):
  """What is wrong with `config`'s handling of each bad value of `field` (mutated in place,
  then restored)."""
  original, failures = _get(config, field), []
  for kind, value in values.items():
    try:
      _set(config, field, value)
    except TypeError:  # ml_collections' type check (the flag parser's, on the command line)
      if type(value) is type(original):
        failures.append(f"{field}={value!r} ({kind}): refused as a wrong type")
      continue
    try:
      configlib.validate(config)
      if not _accepted(kind, field, config):
        failures.append(f"{field}={value!r:.60} ({kind}): passed validation")
    except configlib.ConfigError as e:
      message = str(e)
      if f"config.{field}" not in message or "\n" in message or not message.endswith("."):
        failures.append(f"{field}={value!r:.60} ({kind}): {message}")
    finally:
      _set(config, field, original)
  return failures


@pytest.mark.parametrize("name,arg", CASES)
def test_every_field_refuses_bad_values_in_one_sentence_naming_it(name, arg):
  config = _load(name).get_config(arg)
  configlib.validate(config)
  config.unlock()
  failures = [f for field, value in list(_fields(config))
              for f in _failures(config, field, _bad_values(value))]
  assert not failures, "\n".join(failures)


def test_an_unknown_tfds_name_is_one_sentence_when_the_data_loads():
  with pytest.raises(data.DataError, match=r"^data\.name 'nan' is neither a local IDX dataset"):
    data.load_dataset("nan", "", validation_size=0, seed=0)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "x" * 300])
def test_a_bad_data_dir_is_one_sentence_when_the_data_loads(value):
  with pytest.raises(data.DataError, match=r"^data\.dir '.*' does not exist"):
    data.load_dataset("fashion_mnist", value, validation_size=0, seed=0)


@pytest.mark.parametrize("flag", ["--config.model.width=abc", "--config.pretrain.lr=abc",
                                  "--config.attack.random_start=maybe",
                                  "--config.seed=nan", "--config.nope=1"])
def test_the_flag_parser_refuses_wrong_types_in_one_sentence(flag, monkeypatch, capsys):
  argv = ["admm_jax.main", f"--config={os.path.join(ROOT, 'configs', 'fashion_mnist_lenet.py')}",
          flag]
  monkeypatch.setattr(sys, "argv", argv)
  try:
    with pytest.raises(SystemExit) as e:
      cli.parse_flags(argv)
  finally:
    flags.FLAGS.unparse_flags()
  errors = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
  assert e.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: ")
  assert flag.split("=")[0].removeprefix("--config.") in errors[0], errors


def test_command_line_exits_2_without_a_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "admm_jax.main",
                         f"--config={ROOT}/configs/fashion_mnist_lenet.py:tiny",
                         "--config.model.width=100000", f"--workdir={tmp_path / 'run'}"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert errors == ["error: config.model.width=100000 is invalid: use an integer in [1, 1024]."]
  assert not (tmp_path / "run").exists()
