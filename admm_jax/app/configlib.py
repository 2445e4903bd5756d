"""The config schema: defaults every config file starts from, and validation before any work.

Config files in configs/ call `base_config()` and change what their recipe needs. Every
field can be overridden on the command line: `--config.attack.eps=0.2`. `validate` checks
every field and raises one ConfigError sentence naming the field, the value and what is
allowed; main turns it into exit code 2 without a traceback.
"""
from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from admm_jax import attacks, losses, models, projections, quantization, scores, sparsity
from admm_jax.kernels import CONV_IMPLS
from admm_jax.app.stages import GRIDS, STAGES
from admm_jax.app.errors import UserError

STAGE_ORDER = tuple(STAGES)   # pretrain, admm, retrain, scratch, inherited, scores, finetune
GRID_STAGES = tuple(s for s in STAGES if STAGES[s].finish is not None)  # have a `grid` field
OPTIMIZERS = ("sgd", "adam", "adamw")
SCORE_INITS = ("magnitude", "admm")   # scores.init: the weights the learned mask starts from
SCHEDULES = ("constant", "cosine", "steps", "admm")
SELECT_BY = ("pgd", "apgd-ce")   # eval.select_by: the attack the best epoch is chosen under
LOCAL_DATASETS = ("mnist", "fashion_mnist")   # IDX files in data.dir; with data.dir='' any TFDS
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[a-z0-9_.]+)?(:[0-9.*]+)?")  # image dataset by name
MODELS = tuple(models.REGISTRY)   # the model registry's names
DTYPES = ("float32", "bfloat16")   # model.dtype: the compute dtype
# Upper bounds for values that cannot work beyond them (memory, hours per step, int32 steps).
MAX_WIDTH = 1024           # LeNet/VGG/ResNet width multiplier (16 is the paper's full size)
MAX_BATCH = 2**20
MAX_ATTACK_STEPS = 10_000
MAX_EPOCHS = 100_000


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message is one sentence meant for the user."""


def _stage(epochs: int, optimizer: str, lr: float, schedule: str = "constant",
           **extra) -> ml_collections.ConfigDict:
  stage = ml_collections.ConfigDict(dict(
      epochs=epochs,            # passes over the training split
      optimizer=optimizer,      # sgd | adam | adamw
      lr=lr,                    # base learning rate
      momentum=0.9,             # sgd only
      weight_decay=0.0,         # sgd: coupled L2; adamw: decoupled
      schedule=schedule,        # constant | cosine | steps (x0.1 at lr_drop_epochs) | admm
      lr_drop_epochs=(),        # for schedule=steps
      warmup_epochs=0.0,        # linear ramp of the lr from 0 over this many epochs (fractions ok)
  ))
  stage.update(extra)
  return stage


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every recipe (Fashion-MNIST LeNet, offline)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "pretrain,admm,retrain"   # comma-separated, in this order; also scratch, inherited,
                                        # scores, finetune (learned masks)
  c.init_from = ""                      # another run's workdir: inputs of stages not run here

  c.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist",            # mnist | fashion_mnist; any TFDS image dataset if dir=''
      dir="/usr/share/datasets/fashion-mnist",  # MNIST-format IDX files; '' = TFDS
      tfds_dir="",                     # TFDS data_dir ('' = TFDS default)
      validation_size=2000,            # held out from train, for model selection
      limit_train=0,                   # use only this many training examples (0 = all)
      validation_in_limit=False,       # True: validation_size is carved out of limit_train
      limit_test=0,                    # evaluate on this many test examples (0 = all)
      augment="none",                  # none | cifar (random crop 32 pad 4 + flip)
  ))
  # dtype: the compute dtype (float32 | bfloat16): activations and matmuls; parameters, optimizer
  # state, ADMM's Z/U, the projections, losses and attack iterates stay float32.
  c.model = ml_collections.ConfigDict(dict(name="lenet", width=2, conv_impl="auto",
                                           dtype="float32"))
  c.attack = ml_collections.ConfigDict(dict(
      kind="pgd",              # training attack: pgd | fgsm | none
      eps=0.1,                 # Linf radius, inputs in [0, 1]
      steps=5,                 # training PGD steps
      step_size=0.025,         # training PGD step (5 x 0.025 reaches past eps from any start)
      random_start=True,
      eval_steps=10,           # PGD steps for validation and test (> steps: a stronger attack)
      eval_step_size=0.02,
      objective="madry",       # training loss of every stage: madry | trades | mart
      beta=6.0,                # trades / mart: weight of the KL term (TRADES, MART on CIFAR-10)
  ))
  c.batch_size = 64            # global batch
  c.eval_batch_size = 500
  c.sparsity = ("conv1/kernel=irregular:0.8,conv2/kernel=irregular:0.9,"
                "fc1/kernel=irregular:0.98,fc2/kernel=irregular:0.9")

  # Sized for ~4 minutes on 2 CPU cores; the paper's recipes are in configs/mnist_lenet.py etc.
  # The admm and retrain recipe was chosen on validation at the authors' own budget
  # (docs/method.md section 8, benchmarks/reference_budget.py): Z/U every quarter epoch with
  # rho growing 1.4x from 0.03 (ADMM nears the sparse set in 2 epochs) at a constant SGD lr,
  # then Adam from lr 0.05 down a cosine, after a quarter-epoch warmup (without it a freshly
  # filter-pruned net can die at this lr).
  c.pretrain = _stage(3, "adam", 1e-3)
  c.admm = _stage(2, "sgd", 0.01, "constant", rho=0.03, rho_growth=1.4, update_every_epochs=0.25)
  # Layers with bits: train float under the masks, then project the chosen epoch onto the
  # sparse k-bit set ("end"); "train" keeps them on the grid throughout (straight-through).
  # "end" won on validation at the authors' budget (docs/quantization.md).
  c.retrain = _stage(2, "adam", 0.05, "cosine", warmup_epochs=0.25, grid="end")
  c.scratch = _stage(0, "adam", 1e-3, width=1)   # epochs 0: pretrain+admm+retrain epochs
  # The lottery-ticket baseline: admm's mask (from init_from) on the initial weights of the
  # pretrain stage (same seed), trained with the mask; epochs 0 as for scratch.
  c.inherited = _stage(0, "adam", 1e-3, grid="end")
  # Learned masks (HYDRA): the scores' optimizer, with the weights frozen; init "magnitude"
  # starts from pretrain's weights (HYDRA), "admm" from admm's output. finetune then trains
  # the masked weights with retrain's recipe. HYDRA's SGD (its steps scale with |w|) won on
  # validation over Adam 1e-2, whose normalized steps churn the mask (benchmarks/README.md).
  c.scores = _stage(2, "sgd", 0.1, "cosine", weight_decay=1e-4, init="magnitude")
  c.finetune = _stage(2, "adam", 0.05, "cosine", warmup_epochs=0.25, grid="end")

  c.eval = ml_collections.ConfigDict(dict(
      final_attack="",         # '' = off; else admm_jax.evaluate's --attack on each finished stage
      final_limit=1000,        # first N test examples it attacks (0 = all)
      sanity_limit=200,        # examples of its gradient-masking checks (0 = no checks)
      # Which epoch a stage outputs: "pgd" = best validation accuracy under the eval PGD
      # (attack.eval_steps); "apgd-ce" = best under APGD-CE (attack.eps, Linf, 1 restart) on
      # the first select_limit validation examples, measured every epoch on top of PGD
      # (PGD under-attacks masked models; docs/method.md, "Model selection under APGD-CE").
      select_by="pgd",
      select_limit=1000,       # apgd-ce: first N validation examples it attacks (0 = all)
      select_steps=100,        # apgd-ce: iterations (AutoAttack's 100)
  ))

  c.log_every_steps = 200
  c.checkpoint_every_steps = 500
  c.max_checkpoints = 2
  c.parallel = ml_collections.ConfigDict(dict(
      data_axis=0,             # devices on the data axis; 0 = all devices
      distributed=False,       # call jax.distributed.initialize (multi-process runs)
      coordinator_address="",  # host:port of process 0 (GPU/CPU clusters; TPU pods detect it)
      num_processes=0,
      process_id=-1,
  ))
  return c


def cifar10_recipe(model: str, conv_pattern: str, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe (docs/method.md) for `model`, pruning 0.9375 of
  every conv kernel matched by `conv_pattern` with the kind named by `arg` (default filter).
  """
  kind = arg or "filter"
  if kind not in ("filter", "column", "irregular"):
    raise ValueError(f"unknown config argument {arg!r}: use filter, column or irregular.")
  c = base_config()
  c.data.update(name="cifar10", dir="", validation_size=5000, augment="cifar")
  c.model.update(name=model, width=16)
  c.attack.update(eps=8 / 255, steps=10, step_size=2 / 255, eval_steps=20,
                  eval_step_size=2 / 255)
  c.batch_size = 128
  c.eval_batch_size = 500
  c.sparsity = f"{conv_pattern}={kind}:0.9375"
  sgd = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4)
  c.pretrain.update(epochs=200, lr=0.1, schedule="cosine", **sgd)
  c.admm.update(epochs=200, lr=0.01, schedule="admm", rho=1e-3, rho_growth=1.3,
                update_every_epochs=20, **sgd)
  c.retrain.update(epochs=200, lr=0.01, schedule="steps", lr_drop_epochs=(80, 150), **sgd)
  c.scratch.update(epochs=0, lr=0.1, schedule="cosine", width=1, **sgd)
  c.inherited.update(epochs=0, lr=0.1, schedule="cosine", **sgd)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return c


_BITS = re.compile(r"(\d+)b(-layer|-channel)?")


def _bits_field(item: str, rule: str) -> tuple[str, tuple]:
  """Splits a trailing ':<k>b[-layer]' off a rule: (the rest, () or (bits, scale_mode))."""
  head, sep, last = rule.rpartition(":")
  if not sep or not re.fullmatch(r"\d+b.*", last):
    return rule, ()
  match = _BITS.fullmatch(last)
  if not match:
    raise ConfigError(f"sparsity entry {item!r}: bits field {last!r} is not '<k>b' or "
                      "'<k>b-layer' (e.g. irregular:0.9:4b for 4 bits, a scale per output "
                      "channel).")
  return head, (int(match.group(1)), "layer" if match.group(2) == "-layer" else "channel")


def parse_sparsity(text: str) -> dict[str, tuple]:
  """'pattern=kind:ratio[:<k>b[-layer]][:global],...' -> {pattern: (kind, ratio[, bits,
  scale_mode][, "global"])}; N:M kinds have no ratio ('fc1/kernel=2:4', 'fc1/kernel=2:4:4b').
  A trailing ':4b' puts the kept weights on a 4-bit grid with a scale per output channel,
  ':4b-layer' with one scale for the layer; ':global' shares one ratio over every layer the
  pattern matches ('(conv1|conv2|fc1|fc2)/kernel=irregular:0.9884:global', see
  admm_jax.sparsity)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    pattern, sep, rule = item.rpartition("=")
    if not sep or not pattern:
      raise ConfigError(f"sparsity entry {item!r} is not 'pattern=kind:ratio' "
                        "(e.g. 'conv1/kernel=filter:0.8' or 'fc1/kernel=2:4').")
    rule, shared = (rule[:-len(":global")], ("global",)) if rule.endswith(":global") else (rule, ())
    rule, bits = _bits_field(item, rule)
    bits = bits + shared
    if re.fullmatch(r"\d+:\d+", rule):
      out[pattern] = (rule, None, *bits)
      continue
    kind, _, ratio = rule.partition(":")
    try:
      out[pattern] = (kind, float(ratio), *bits)
    except ValueError:
      raise ConfigError(f"sparsity entry {item!r}: ratio {ratio!r} is not a number "
                        "(write kind:ratio, e.g. irregular:0.9).") from None
  return out


def override(config: ml_collections.ConfigDict, fields: dict[str, Any]
             ) -> ml_collections.ConfigDict:
  """Sets dotted fields ({"data.limit_train": 1000}) on `config`, as --config.* flags do;
  returns it."""
  for field, value in fields.items():
    *parents, leaf = field.split(".")
    target = config
    for part in parents:
      target = target[part]
    target[leaf] = value
  return config


def stages(config: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in config.stages.split(",") if s.strip()]


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}.")


def _positive_int(config, field: str, zero_ok: bool = False, most: int = 2**31 - 1):
  """An int in [0 or 1, most]; the default bound keeps step and seed arithmetic in int32/64."""
  value = config
  for part in field.split("."):
    value = value[part]
  least = 0 if zero_ok else 1
  if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
    _fail(field, value, f"use an integer in [{least}, {most}]")


def _number(config, field: str, lo: float, hi: float, lo_open=False, hi_open=False):
  value = config
  for part in field.split("."):
    value = value[part]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  if not ok:
    _fail(field, value,
          f"use a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field; raises ConfigError naming the first bad one."""
  names = stages(config)
  for s in names:
    if s not in STAGE_ORDER:
      _fail("stages", config.stages,
            f"stages are a comma-separated subset of {','.join(STAGE_ORDER)}")
  if not names:
    _fail("stages", config.stages, "name at least one stage")
  order = [STAGE_ORDER.index(s) for s in names]
  if order != sorted(order) or len(set(order)) != len(order):
    _fail("stages", config.stages, f"list each stage once, in the order {','.join(STAGE_ORDER)}")
  _positive_int(config, "seed", zero_ok=True)
  if not isinstance(config.data.name, str) or not _TFDS_NAME.fullmatch(config.data.name):
    _fail("data.name", config.data.name, f"use one of {', '.join(LOCAL_DATASETS)} or, with "
          "data.dir='', a TFDS image classification dataset such as cifar10")
  if config.data.dir and config.data.name not in LOCAL_DATASETS:
    _fail("data.dir", config.data.dir, "local IDX files exist only for mnist and fashion_mnist, "
          f"not config.data.name={config.data.name!r}; set data.dir='' to use TFDS for it")
  for f in ("data.validation_size", "data.limit_train", "data.limit_test"):
    _positive_int(config, f, zero_ok=True)
  if not isinstance(config.data.validation_in_limit, bool):
    _fail("data.validation_in_limit", config.data.validation_in_limit, "use True or False")
  if (config.data.validation_in_limit and config.data.limit_train
      and config.data.validation_size >= config.data.limit_train):
    _fail("data.validation_size", config.data.validation_size,
          f"with data.validation_in_limit=True it is carved out of data.limit_train="
          f"{config.data.limit_train}, so it must be smaller")
  if config.data.augment not in ("none", "cifar"):
    _fail("data.augment", config.data.augment, "use 'none' or 'cifar'")
  if config.model.name not in MODELS:
    _fail("model.name", config.model.name, f"use one of {', '.join(MODELS)}")
  _positive_int(config, "model.width", most=MAX_WIDTH)
  if config.model.conv_impl not in CONV_IMPLS:
    _fail("model.conv_impl", config.model.conv_impl,
          f"use one of {', '.join(CONV_IMPLS)} (see admm_jax.models.conv_module)")
  if config.model.dtype not in DTYPES:
    _fail("model.dtype", config.model.dtype, f"use one of {', '.join(DTYPES)} (bfloat16: "
          "activations and matmuls in bfloat16, parameters and optimizer state in float32)")
  if config.attack.kind not in ("pgd", "fgsm", "none"):
    _fail("attack.kind", config.attack.kind, "use 'pgd', 'fgsm' or 'none'")
  _number(config, "attack.eps", 0.0, 1.0)
  _number(config, "attack.step_size", 0.0, 1.0, lo_open=True)
  _number(config, "attack.eval_step_size", 0.0, 1.0, lo_open=True)
  _positive_int(config, "attack.steps", most=MAX_ATTACK_STEPS)
  _positive_int(config, "attack.eval_steps", most=MAX_ATTACK_STEPS)
  if config.attack.objective not in losses.OBJECTIVES:
    _fail("attack.objective", config.attack.objective,
          f"use one of {', '.join(losses.OBJECTIVES)}")
  _number(config, "attack.beta", 0.0, 1000.0)
  _positive_int(config, "batch_size", most=MAX_BATCH)
  _positive_int(config, "eval_batch_size", most=MAX_BATCH)
  final = config.eval.final_attack
  if not isinstance(final, str) or (final and final != "autoattack" and any(
      n.strip() not in attacks.ATTACK_NAMES for n in final.split(","))):
    _fail("eval.final_attack", final, "use '' (off), autoattack, one of "
          f"{', '.join(attacks.ATTACK_NAMES)}, or a comma-separated list of them")
  _positive_int(config, "eval.final_limit", zero_ok=True)
  _positive_int(config, "eval.sanity_limit", zero_ok=True)
  if config.eval.select_by not in SELECT_BY:
    _fail("eval.select_by", config.eval.select_by, "use 'pgd' (best validation accuracy under "
          "the eval PGD) or 'apgd-ce' (under APGD-CE on eval.select_limit validation examples)")
  _positive_int(config, "eval.select_limit", zero_ok=True)
  _positive_int(config, "eval.select_steps", most=MAX_ATTACK_STEPS)
  if config.eval.select_by == "apgd-ce" and config.data.validation_size == 0:
    _fail("eval.select_by", config.eval.select_by, "it selects on validation examples and "
          "data.validation_size=0 holds out none; set data.validation_size > 0 or use 'pgd'")
  _positive_int(config, "log_every_steps")
  _positive_int(config, "checkpoint_every_steps")
  _positive_int(config, "max_checkpoints")
  for s in STAGE_ORDER:
    stage = config[s]
    _positive_int(config, f"{s}.epochs", zero_ok=STAGES[s].budget_at_zero, most=MAX_EPOCHS)
    if stage.optimizer not in OPTIMIZERS:
      _fail(f"{s}.optimizer", stage.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
    _number(config, f"{s}.lr", 0.0, 10.0, lo_open=True)
    _number(config, f"{s}.momentum", 0.0, 1.0, hi_open=True)
    _number(config, f"{s}.weight_decay", 0.0, 1.0)
    if stage.schedule not in SCHEDULES or (stage.schedule == "admm" and s != "admm"):
      _fail(f"{s}.schedule", stage.schedule, "use constant, cosine or steps (admm: also admm)")
    _number(config, f"{s}.warmup_epochs", 0.0, float(max(stage.epochs, 1)))
    if any(isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= max(stage.epochs, 1)
           for e in stage.lr_drop_epochs):
      _fail(f"{s}.lr_drop_epochs", stage.lr_drop_epochs,
            f"use a tuple of epochs in [1, {s}.epochs={stage.epochs}]")
  for s in GRID_STAGES:
    if config[s].grid not in GRIDS:
      _fail(f"{s}.grid", config[s].grid, "use 'end' (train float, project onto the k-bit grid "
            "at the end) or 'train' (straight-through on the grid throughout)")
  _number(config, "admm.rho", 0.0, 1e6, lo_open=True)
  _number(config, "admm.rho_growth", 0.0, 100.0, lo_open=True)
  _number(config, "admm.update_every_epochs", 0.0, 1e6, lo_open=True)
  _positive_int(config, "scratch.width", most=MAX_WIDTH)
  if config.scores.init not in SCORE_INITS:
    _fail("scores.init", config.scores.init, "use 'magnitude' (scores from pretrain's weights) "
          "or 'admm' (from admm's output)")
  _positive_int(config, "parallel.data_axis", zero_ok=True)
  _positive_int(config, "parallel.num_processes", zero_ok=True)
  p = config.parallel
  if isinstance(p.process_id, bool) or not isinstance(p.process_id, int) or not (
      -1 <= p.process_id < (p.num_processes or 2**31 - 1)):
    _fail("parallel.process_id", p.process_id, "use -1 (detect) or an integer in [0, "
          "parallel.num_processes)")
  if any(STAGES[s].sparse for s in names):
    try:
      rules = parse_sparsity(config.sparsity)
    except ConfigError as e:
      raise ConfigError(f"config.sparsity: {e}") from None
    if not rules:
      _fail("sparsity", config.sparsity, "name at least one 'pattern=kind:ratio' for the "
            f"pruning stages ({', '.join(s for s in names if STAGES[s].sparse)})")
    for pattern, (kind, ratio, *bits) in rules.items():
      try:
        if bits and bits[-1] == "global":  # the library's own checks of a global entry
          sparsity.spec({pattern: (kind, ratio, *bits)})
          continue
        re.compile(pattern)
        projections.validate(kind, ratio, where=f"pattern {pattern!r}")
        if bits:
          quantization.validate(*bits, where=f"pattern {pattern!r}")
      except (ValueError, re.error) as e:
        raise ConfigError(f"config.sparsity={config.sparsity!r} is invalid: {e}") from None
    if "scores" in names:
      try:
        scores.check([r for _, r in sparsity.spec(rules).rules])
      except ValueError as e:
        raise ConfigError(f"config.sparsity={config.sparsity!r} cannot give the scores stage "
                          f"a mask: {e}") from None
