"""The authors' code in a cell of the budget grid (budget_grid.py), and APGD-CE+T on the final
pruned models it saves.

Their code (github yeshaokai/Robustness-Aware-Pruning-ADMM) is not part of this repository and
nothing of it enters it: export it to a folder outside the repository (e.g. `git clone` it, or
`git -C <mirror> archive HEAD | tar -x -C /work/refcode/pristine`). The harness that ports it to
CPU and Fashion-MNIST is ../shared/reference-authors (run.sh, changes.diff, final_save.diff,
configs/; see its README.md). Needs a python with torch, numpy, pyyaml, scipy and tensorboardX
(their modules import it) for `run`, and admm_jax's environment plus torch for `attack`.

    # one cell and seed: pretrain -> filter admm/retrain -> irregular admm/retrain (their run.sh)
    python benchmarks/reference_grid.py run --budget=20000x5 --seed=0 \
        --code=/work/refcode/pristine --out=/work/refruns/20000x5_s0 [--threads=1]
    # then their final models under our evaluation: one JSON line per scheme, budget_grid's keys
    python benchmarks/reference_grid.py attack --out=/work/refruns/20000x5_s0 [--limit=1000]

`run` copies the export (<out>/code) and the harness (<out>/harness), sets the cell in the
harness's configs (`epochs: E-1`: their loop runs epochs + 1 passes; `random_seed`), applies
changes.diff and final_save.diff (the retrain stage also saves its final in-memory model as
*_final.pt: their own save keeps the best-on-test checkpoint, for filter pruning the dense
ADMM model it loaded), and runs run.sh with TRAIN_SUBSET=<examples> (their first N training
examples; they hold no validation out) and RUN_PROBE=0: logs in <out>/logs/<stage>.log, wall
times in <out>/logs/walltimes.txt. Their code cannot resume: an interrupted run is started
again in a new --out. `attack` converts each final model to admm_jax's LeNet(4) params
(bench_torch.flax_params_from_torch, checked against their own forward on the test split),
stores it as a finished stage of a run under <out>/ours/<scheme>, and attacks it exactly as
budget_grid.py attacks ours (reference_budget.attack_stage: APGD-CE then APGD-T, first 1000
test examples, with the gradient-masking checks). natural is our forward on the full test
split (checked against their log's last test evaluation), pgd10 their own last PGD-10 test
evaluation (full test split) from the log, wall_s their three stages for that scheme.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import budget_grid   # benchmarks/ is on sys.path when this file runs
import reference_budget as rb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(os.path.dirname(ROOT), "shared", "reference-authors")
SCHEMES = ("filter", "irregular")   # run.sh's order
MNIST = os.path.join("ADMM_examples", "mnist")


def cell_configs(harness_configs: str, epochs: int, seed: int) -> dict[str, str]:
  """The harness's fmnist_<scheme>.yaml texts with `epochs: epochs - 1` in the pretrain, admm
  and retrain sections (their loop runs epochs + 1 passes) and `random_seed: seed`."""
  import yaml  # pylint: disable=import-outside-toplevel
  out = {}
  for scheme in SCHEMES:
    with open(os.path.join(harness_configs, f"fmnist_{scheme}.yaml")) as f:
      config = yaml.safe_load(f)
    for section in ("pretrain", "admm", "retrain"):
      config[section]["epochs"] = epochs - 1
    config["adv"]["random_seed"] = seed
    out[f"fmnist_{scheme}.yaml"] = yaml.safe_dump(config, sort_keys=False)
  return out


def run(budget: str, seed: int, code: str, out: str, harness: str, python: str,
        threads: int, train_subset: int = 0) -> int:
  """Their run.sh on a fresh copy of their code for one budget and seed; returns its exit code.
  `train_subset` replaces the budget's training examples (a smoke test of the pipeline)."""
  examples, epochs = budget_grid.parse_budget(budget)
  examples = train_subset or examples
  if os.path.exists(out):
    raise SystemExit(f"error: --out={out} exists: their code cannot resume, so each run gets a "
                     "new folder (move the old one aside).")
  if not os.path.exists(os.path.join(code, MNIST, "adv_main.py")):
    raise SystemExit(f"error: --code={code} holds no {MNIST}/adv_main.py: export their "
                     "repository there (see this file's docstring).")
  shutil.copytree(code, os.path.join(out, "code"), symlinks=True)
  shutil.copytree(harness, os.path.join(out, "harness"))
  h = os.path.join(out, "harness")
  for name, text in cell_configs(os.path.join(harness, "configs"), epochs, seed).items():
    with open(os.path.join(h, "configs", name), "w") as f:
      f.write(text)
  with open(os.path.join(h, "run.sh")) as f:   # run.sh pins 2 threads; let --threads choose
    script = f.read().replace("NUM_THREADS=2 ", 'NUM_THREADS="${NUM_THREADS:-2}" ')
  with open(os.path.join(h, "run.sh"), "w") as f:
    f.write(script)
  for diff in ("changes.diff", "final_save.diff"):
    with open(os.path.join(h, diff)) as f:
      subprocess.run(["patch", "-d", os.path.join(out, "code"), "-p1", "-s"], stdin=f, check=True)
  meta = {"budget": f"{examples}x{epochs}", "examples": examples, "epochs_per_stage": epochs,
          "seed": seed, "train_subset": examples, "threads": threads, "python": python,
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
  _write(os.path.join(out, "cell.json"), meta)
  env = dict(os.environ, TRAIN_SUBSET=str(examples), RUN_PROBE="0", PY=python,
             NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
  t0 = time.time()
  rc = subprocess.run(["bash", os.path.join(h, "run.sh"), os.path.join(out, "code"),
                       os.path.join(out, "logs")], env=env, check=False).returncode
  meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), exit_code=rc,
              wall_s=round(time.time() - t0, 1))
  _write(os.path.join(out, "cell.json"), meta)
  return rc


def _write(path: str, obj: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def log_tests(log_text: str) -> list[tuple[float, float]]:
  """Every test evaluation of their log, in order: (natural, PGD-10) as fractions."""
  return [(float(a) / 100, float(b) / 100) for a, b in re.findall(
      r"nat_Accuracy: \d+/\d+ \(([\d.]+)%\).*?adv Accuracy: \d+/\d+ \(([\d.]+)%\)", log_text, re.S)]


def stage_walls(walltimes_text: str) -> dict[str, float]:
  """run.sh's walltimes.txt ('STAGE_WALL <stage> <s>s' lines) -> {stage: seconds}."""
  return {m[1]: float(m[2]) for m in re.finditer(r"STAGE_WALL (\S+) ([\d.]+)s", walltimes_text)}


def import_model(ckpt: str, workdir: str, seed: int, examples: int, epochs: int, scheme: str,
                 stage: str = "retrain") -> dict[str, float]:
  """Stores their saved model as a finished `stage` of an admm_jax run in `workdir` (report.json
  with the cell's config, outputs/<stage>), so that admm_jax.evaluate attacks it as it
  attacks ours. Returns {"natural": our accuracy on the full test split, "max_logit_diff":
  the largest |our logit - their log-probability + its log-sum-exp| on 1000 test examples}.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  import torch
  import bench_torch
  from admm_jax import models
  from admm_jax.app import checkpoint, data, train
  from admm_jax.app.workdir import stage_paths, write_json_atomic
  sd = torch.load(ckpt, map_location="cpu")
  width = rb.BUDGET["model.width"]
  params = bench_torch.flax_params_from_torch(sd, width)
  # The config evaluate rebuilds the model and the test split from; their training split was
  # their first `examples` (report.json's "imported_from" says whose model it is).
  config = rb.make_config(seed, {**budget_grid.Cell(examples, epochs, scheme).settings(),
                                 **rb.NO_FINAL, "data.limit_train": 0,
                                 "data.validation_in_limit": False},
                          stages="admm,retrain", sparsity=rb.SCHEMES[scheme])
  d = config.data
  test = data.load_dataset(d.name, d.dir, d.validation_size, seed).test
  images, labels = test.arrays()
  x = images.astype(np.float32) / np.float32(255.0)
  model = models.get_model("lenet", width)
  logits = np.asarray(jax.jit(train.logits_fn(model, {}, train=False))(params, x))
  tmodel = bench_torch.build_model("lenet", width, 1)
  tmodel.load_state_dict({k.removeprefix("basic_model.").removeprefix("module."): v
                          for k, v in sd.items()})
  with torch.no_grad():   # their forward is log_softmax(logits): compare up to that shift
    theirs = tmodel(torch.from_numpy(x[:1000].transpose(0, 3, 1, 2).copy())).numpy()
  ours = logits[:1000] - np.log(np.exp(logits[:1000]).sum(1, keepdims=True))
  theirs = theirs - np.log(np.exp(theirs).sum(1, keepdims=True))
  check = {"natural": float(np.mean(logits.argmax(1) == labels)),
           "max_logit_diff": float(np.abs(ours - theirs).max())}
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, "report.json"),
                    {"config": config.to_dict(), "imported_from": os.path.abspath(ckpt),
                     "authors_train_examples": examples})
  paths = stage_paths(workdir, stage)
  checkpoint.save_output(paths.output, {"params": jax.tree.map(np.asarray, params),
                                        "batch_stats": {}})
  write_json_atomic(paths.done, {"imported_from": os.path.abspath(ckpt), **check})
  return check


def attack(out: str, limit: int, sanity: bool = True) -> list[dict]:
  """budget_grid's line for each scheme whose final model the run in `out` saved."""
  with open(os.path.join(out, "cell.json")) as f:
    meta = json.load(f)
  logs = os.path.join(out, "logs")
  mnist = os.path.join(out, "code", MNIST)
  with open(os.path.join(logs, "walltimes.txt")) as f:
    walls = stage_walls(f.read())
  lines = []
  for scheme in SCHEMES:
    ckpt = os.path.join(mnist, f"lenet_adv_retrained_{scheme}_final.pt")
    if not os.path.exists(ckpt):
      continue
    with open(os.path.join(logs, f"retrain_{scheme}.log")) as f:
      last = log_tests(f.read())[-1]   # their evaluation of the final in-memory model
    where = os.path.join(out, "ours", scheme)
    check = import_model(ckpt, where, meta["seed"], meta["examples"], meta["epochs_per_stage"],
                         scheme)
    if abs(check["natural"] - last[0]) > 1e-4 or check["max_logit_diff"] > 1e-3:
      raise SystemExit(f"error: {ckpt} converted gives natural {check['natural']:.4f} (their "
                       f"log: {last[0]:.4f}), logits off by {check['max_logit_diff']:.1e}: the "
                       "weight conversion or the data differ.")
    result = rb.attack_stage(where, "retrain", limit=limit, sanity=sanity)
    lines.append({"cell": f"{meta['budget']}:{scheme}", "seed": meta["seed"],
                  "natural": check["natural"], "pgd10": last[1],
                  "apgd_ce_t": result["robust_accuracy"],
                  "wall_s": round(sum(walls.get(s, 0.0) for s in
                                      ("pretrain", f"admm_{scheme}", f"retrain_{scheme}")), 1),
                  "code": "authors", "apgd_examples": result["examples"],
                  "apgd_sanity_failed": result["sanity_failed"],
                  "max_logit_diff": check["max_logit_diff"]})
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="their run.sh for one budget and seed")
  r.add_argument("--budget", required=True, help="<examples>x<epochs>, e.g. 20000x5")
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--code", required=True, help="an export of their repository (left unchanged)")
  r.add_argument("--out", required=True, help="a new folder outside the repository")
  r.add_argument("--harness", default=HARNESS, help="the reference-authors harness")
  r.add_argument("--python", default=sys.executable, help="python with torch & their deps")
  r.add_argument("--threads", type=int, default=2, help="torch threads (run.sh's default 2)")
  r.add_argument("--train-subset", type=int, default=0,
                 help="other training examples than the budget's (smoke tests only)")
  a = sub.add_parser("attack", help="APGD-CE+T on the final models of a finished `run`")
  a.add_argument("--out", required=True)
  a.add_argument("--limit", type=int, default=rb.ATTACK_LIMIT)
  a.add_argument("--no-sanity", action="store_true", help="skip the gradient-masking checks")
  args = parser.parse_args(argv)
  if args.command == "run":
    try:
      return run(args.budget, args.seed, os.path.abspath(args.code), os.path.abspath(args.out),
                 os.path.abspath(args.harness), args.python, args.threads, args.train_subset)
    except budget_grid.CellsError as e:
      print(f"error: --budget: {e}", file=sys.stderr)
      return 2
  for line in attack(os.path.abspath(args.out), args.limit, not args.no_sanity):
    print(json.dumps(line), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
