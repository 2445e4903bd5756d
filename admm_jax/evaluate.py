"""Command line: AutoAttack-grade evaluation of a finished stage, with gradient-masking checks.

  python -m admm_jax.evaluate --workdir=runs/fmnist [--stage=retrain] [--attack=autoattack]
      [--eps=<the run's attack.eps>] [--norm=linf] [--limit=N] [--batch_size=B]

Prints one JSON line; the files it writes and resumes from: `admm_jax.app.evaluate`.
"""
import json

from absl import flags

from admm_jax import attacks
from admm_jax.app import cli, parallel
from admm_jax.app.evaluate import SANITY_LIMIT, evaluate_workdir

_SUMMARY_KEYS = ("stage", "attack", "eps", "examples", "clean_accuracy", "robust_accuracy",
                 "per_attack", "wall_time_s")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's workdir (holds report.json).")
  flags.DEFINE_string("stage", "retrain", "A finished stage of the run.")
  flags.DEFINE_string("attack", "autoattack", "autoattack, one of "
                      f"{', '.join(attacks.ATTACK_NAMES)}, or a comma-separated cascade.")
  flags.DEFINE_float("eps", None, "Threat radius (default: the run's config.attack.eps).")
  flags.DEFINE_string("norm", "linf", "linf or l2.")
  flags.DEFINE_integer("limit", 0, "Evaluate the first N test examples (0 = all).")
  flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the run's eval_batch_size).")
  flags.DEFINE_bool("no_sanity", False, "Skip the gradient-masking checks.")
  flags.DEFINE_integer("sanity_limit", SANITY_LIMIT, "Examples the sanity checks attack.")


def main() -> None:
  f = flags.FLAGS
  record = evaluate_workdir(f.workdir, f.stage, attack=f.attack, eps=f.eps, norm=f.norm,
                            limit=f.limit, batch_size=f.batch_size, sanity=not f.no_sanity,
                            sanity_limit=f.sanity_limit)
  if parallel.is_writer():
    print(json.dumps({k: record[k] for k in _SUMMARY_KEYS}))


def run() -> None:
  _define_flags()
  cli.run(main, required=["workdir"])


if __name__ == "__main__":
  run()
