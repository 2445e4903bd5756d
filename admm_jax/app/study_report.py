"""report.md and plots/ of a study (admm_jax.study): the paper's four findings, measured.

Every number is a test accuracy in %, the mean over seeds with its spread (sample standard
deviation). A claim "holds" when its side is ahead by more than the combined spread
sqrt(s1^2 + s2^2) of the two means compared, "no" when it is behind by that much, and is
"within noise" otherwise: with two or three seeds a difference smaller than the spread is not
evidence either way.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from admm_jax.app import plot

SCHEME_ORDER = ("irregular", "column", "filter")  # the paper's claim: best to worst
RULE = ("'yes' when the claimed side is ahead by more than the combined spread "
        "sqrt(s1² + s2²) of the two means compared, 'no' when behind by more, 'within noise' "
        "otherwise")


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and spread (sample standard deviation, 0 for one value) of `n` values."""
  mean: float
  spread: float
  n: int

  @classmethod
  def of(cls, values: list[float]) -> Stat | None:
    values = [float(v) for v in values if v is not None]
    if not values:
      return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return cls(mean, math.sqrt(var), len(values))

  def minus(self, other: Stat) -> Stat:
    return Stat(self.mean - other.mean, math.hypot(self.spread, other.spread),
                min(self.n, other.n))

  def text(self, sign: bool = False) -> str:
    """'71.2 ± 0.8 (n=2)' in %; with sign=True a difference in points: '+3.1 ± 1.0'."""
    mean = f"{100 * self.mean:+.1f}" if sign else f"{100 * self.mean:.1f}"
    spread = f" ± {100 * self.spread:.1f}" if self.n > 1 or self.spread else ""
    return f"{mean}{spread}" + ("" if sign else f" (n={self.n})")


def verdict(a: Stat | None, b: Stat | None) -> str:
  """Is a above b? 'yes', 'no' or 'within noise' (see RULE); 'not measured' if one is missing."""
  if a is None or b is None:
    return "not measured"
  diff = a.minus(b)
  if diff.mean > diff.spread:
    return "yes"
  return "no" if diff.mean < -diff.spread else "within noise"


def _stats(cells: list[dict], kind: str, key: Callable[[dict], Any],
           field: str | Callable[[dict], float | None]) -> dict[Any, Stat]:
  """{group: Stat of results[field] (or of field(cell))} over the finished cells of `kind`,
  grouped by key(cell); groups without a value are left out."""
  value = (lambda c: c["results"][field]) if isinstance(field, str) else field
  groups: dict[Any, list[float]] = {}
  for c in cells:
    if c["kind"] == kind and c["status"] == "finished":
      groups.setdefault(key(c), []).append(value(c))
  stats = {k: Stat.of(v) for k, v in sorted(groups.items())}
  return {k: v for k, v in stats.items() if v is not None}


def _text(stat: Stat | None) -> str:
  return stat.text() if stat else "not measured"


NAT, ADV = "natural_accuracy", "adversarial_accuracy"


# ----------------------------------------------------------------------------- findings

def capacity_rows(cells: list[dict]) -> list[tuple[str, str, str]]:
  """Finding 1: accuracy against width."""
  rows = []
  stats = {f: _stats(cells, "capacity", lambda c: c["width"], f) for f in (NAT, ADV)}
  widths = sorted(stats[ADV])
  if len(widths) < 2:
    return [("accuracy grows with the width w", "fewer than two widths finished",
             "not measured")]
  for field, name in ((NAT, "natural"), (ADV, "adversarial")):
    s = stats[field]
    overall = verdict(s[widths[-1]], s[widths[0]])
    drops = [(a, b) for a, b in zip(widths, widths[1:]) if verdict(s[a], s[b]) == "yes"]
    holds = "no" if overall == "no" else (
        f"no (falls from w={drops[0][0]} to w={drops[0][1]})" if drops else overall)
    rows.append((f"{name} accuracy grows with the width w",
                 "; ".join(f"w={w}: {_text(s[w])}" for w in widths), holds))
  lo, hi = widths[0], widths[-1]
  gain = {f: stats[f][hi].minus(stats[f][lo]) for f in (NAT, ADV)}
  rows.append((f"robustness needs more width than natural accuracy: from w={lo} to w={hi} "
               "adversarial accuracy gains more points than natural accuracy",
               f"gain natural {gain[NAT].text(sign=True)}, adversarial "
               f"{gain[ADV].text(sign=True)} points", verdict(gain[ADV], gain[NAT])))
  return rows


def _params(cells: list[dict], kind: str, target: int) -> int | None:
  for c in cells:
    if c["kind"] == kind and c.get("target_width") == target and c["status"] == "finished":
      return c["results"]["nonzero_params"]
  return None


def pruned_vs_scratch_rows(cells: list[dict]) -> list[tuple[str, str, str]]:
  """Finding 2: the wide network pruned to a small one's size against the small one trained
  from scratch with the same epochs."""
  rows = []
  targets = sorted({c["target_width"] for c in cells if c["kind"] in ("pruned", "scratch")},
                   reverse=True)
  for t in targets:
    wide = next((c["width"] for c in cells if c["kind"] == "pruned"), "?")
    for field, name in ((ADV, "adversarial"), (NAT, "natural")):
      pruned = _stats(cells, "pruned", lambda c: c["target_width"], field).get(t)
      scratch = _stats(cells, "scratch", lambda c: c["target_width"], field).get(t)
      rows.append((f"w={wide} ADMM-pruned to the parameter count of w={t} "
                   f"({_params(cells, 'scratch', t) or '?'} params) beats w={t} trained from "
                   f"scratch for the same epochs: {name} accuracy",
                   f"pruned {_text(pruned)} vs scratch {_text(scratch)}",
                   verdict(pruned, scratch)))
  return rows


def inherited_rows(cells: list[dict]) -> list[tuple[str, str, str]]:
  """Finding 3: the lottery-ticket baseline does not reach the pruned network."""
  rows = []
  for t in sorted({c["target_width"] for c in cells if c["kind"] == "inherited"}, reverse=True):
    for field, name in ((ADV, "adversarial"), (NAT, "natural")):
      s = {k: _stats(cells, k, lambda c: c["target_width"], field).get(t)
           for k in ("pruned", "inherited", "scratch")}
      rows.append((f"inherited initialization (the pruned mask on the wide network's initial "
                   f"weights, same epochs) does not rescue the w={t}-sized network: the pruned "
                   f"network stays ahead in {name} accuracy",
                   f"pruned {_text(s['pruned'])} vs inherited {_text(s['inherited'])} "
                   f"(scratch {_text(s['scratch'])})", verdict(s["pruned"], s["inherited"])))
  return rows


def scheme_rows(cells: list[dict]) -> list[tuple[str, str, str]]:
  """Finding 4: irregular >= column >= filter at equal per-layer pruning ratios."""
  rows = []
  key = lambda c: (c["scheme"], c["ratio"])
  adv = _stats(cells, "schemes", key, ADV)
  comp = _stats(cells, "schemes", key, "compression")
  present = [k for k in SCHEME_ORDER if any(s == k for s, _ in adv)]
  for ratio in sorted({r for _, r in adv}):
    order = [k for k in present if (k, ratio) in adv]
    verdicts = [verdict(adv[(a, ratio)], adv[(b, ratio)]) for a, b in zip(order, order[1:])]
    holds = ("not measured" if len(order) < 2 else "no" if "no" in verdicts else
             "within noise" if "within noise" in verdicts else "yes")
    rows.append((f"at {ratio:g} of every pruned layer removed: adversarial accuracy "
                 f"{' ≥ '.join(order) or 'of the schemes'}",
                 " · ".join(f"{k} {_text(adv[(k, ratio)])}, {comp[(k, ratio)].mean:.1f}x"
                            for k in order), holds))
  return rows + speedup_rows(cells)


def _ratio(numerator: Callable[[dict], float], denominator: Callable[[dict], float]
           ) -> Callable[[dict], float | None]:
  """cell -> numerator / denominator of its compaction record (None when not measured)."""
  return lambda c: (numerator(c["compaction"]) / denominator(c["compaction"])
                    if c.get("compaction") else None)


def speedup_rows(cells: list[dict]) -> list[tuple[str, str, str]]:
  """Finding 4's second half: the compacted network (admm_jax.export) runs faster than the
  masked dense one, more so for the structured schemes than for irregular pruning."""
  key = lambda c: (c["scheme"], c["ratio"])
  speed = _stats(cells, "schemes", key, _ratio(lambda m: m["latency_s"]["dense_masked"],
                                               lambda m: m["latency_s"]["compact"]))
  flops = _stats(cells, "schemes", key, _ratio(lambda m: m["flops_per_example"]["dense"],
                                               lambda m: m["flops_per_example"]["compact"]))
  if not speed:
    return [("structured pruning (column, filter) gives real speed-ups", "not measured "
             "(config.measure_compaction is off)", "not measured")]
  device = next(c["compaction"]["device"] for c in cells if c.get("compaction"))
  batch = next(c["compaction"]["batch"] for c in cells if c.get("compaction"))
  rows = []
  for ratio in sorted({r for _, r in speed}):
    order = [k for k in SCHEME_ORDER if (k, ratio) in speed]
    base = speed.get(("irregular", ratio))
    verdicts = [verdict(speed[(k, ratio)], base) for k in order if k != "irregular"]
    holds = ("not measured" if base is None or not verdicts else "no" if "no" in verdicts
             else "within noise" if "within noise" in verdicts else "yes")
    rows.append((f"at {ratio:g}: the compact network's speed-up over the masked dense one "
                 f"(latency, batch {batch}, {device}) is larger for column and filter than for "
                 "irregular pruning",
                 " · ".join(f"{k} {speed[(k, ratio)].mean:.2f}x ± "
                            f"{speed[(k, ratio)].spread:.2f} (FLOPs "
                            f"{flops[(k, ratio)].mean:.1f}x fewer)" for k in order), holds))
  return rows


FINDINGS = (
    ("Capacity", "Natural and adversarial accuracy both grow with the width w; robustness needs "
     "more width than natural accuracy does.", capacity_rows, "capacity.png"),
    ("Pruning against small-from-scratch", "A wide network pruned by ADMM to the parameter count "
     "of a narrower one keeps far higher adversarial (and natural) accuracy than the narrower "
     "network trained adversarially from scratch with the same training budget.",
     pruned_vs_scratch_rows, "pruned_scratch_inherited.png"),
    ("Inherited initialization", "Inherited initialization (the lottery ticket: the pruned "
     "network's mask on the wide network's initial weights, retrained) does not rescue the small "
     "network in the adversarial setting.", inherited_rows, "pruned_scratch_inherited.png"),
    ("Sparsity schemes", "Irregular pruning keeps accuracy to higher compression rates than "
     "column pruning, and column than filter pruning; structured pruning is what gives real "
     "speed-ups.", scheme_rows, "schemes.png"),
)


# -------------------------------------------------------------------------------- plots

def plot_capacity(cells: list[dict], path: str) -> str | None:
  stats = {f: _stats(cells, "capacity", lambda c: c["width"], f) for f in (NAT, ADV)}
  if not stats[ADV]:
    return None
  fig, (ax,) = plot.new_figure(1, height=3.5, width=5.5)
  for field, label in ((NAT, "natural"), (ADV, "adversarial")):
    widths = list(stats[field])
    line = ax.errorbar(widths, [100 * stats[field][w].mean for w in widths],
                       yerr=[100 * stats[field][w].spread for w in widths], marker="o",
                       capsize=3, label=label)
    seeds = [(c["width"], 100 * c["results"][field]) for c in cells
             if c["kind"] == "capacity" and c["status"] == "finished"]
    ax.plot(*zip(*seeds), ".", color=line[0].get_color(), alpha=0.4)
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(stats[ADV]), [str(w) for w in stats[ADV]])
  ax.set(xlabel="width w", ylabel="test accuracy %", title="dense adversarial training")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=100)
  return path


def plot_schemes(cells: list[dict], path: str) -> str | None:
  key = lambda c: (c["scheme"], c["ratio"])
  adv, comp = (_stats(cells, "schemes", key, f) for f in (ADV, "compression"))
  if not adv:
    return None
  fig, (ax,) = plot.new_figure(1, height=3.5, width=5.5)
  for scheme in [k for k in SCHEME_ORDER if any(s == k for s, _ in adv)]:
    keys = sorted(k for k in adv if k[0] == scheme)
    ax.errorbar([comp[k].mean for k in keys], [100 * adv[k].mean for k in keys],
                yerr=[100 * adv[k].spread for k in keys], marker="o", capsize=3, label=scheme)
  wide = next(c["width"] for c in cells if c["kind"] == "schemes")
  dense = _stats(cells, "capacity", lambda c: c["width"], ADV).get(wide)
  if dense:
    ax.axhline(100 * dense.mean, ls="--", color="0.5", label=f"dense w={wide}")
  ax.set_xscale("log")
  ticks = sorted({max(1, round(c.mean)) for c in comp.values()})
  ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
  ax.minorticks_off()
  ax.set(xlabel="compression (dense / nonzero parameters)", ylabel="adversarial accuracy %",
         title=f"pruning schemes, w={wide}")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=100)
  return path


def plot_pruned_scratch_inherited(cells: list[dict], path: str) -> str | None:
  kinds = [k for k in ("pruned", "scratch", "inherited") if any(c["kind"] == k for c in cells)]
  targets = sorted({c["target_width"] for c in cells if c["kind"] in kinds}, reverse=True)
  if not targets:
    return None
  fig, axes = plot.new_figure(1, 2, width=4.5, height=3.5)
  bar = 0.8 / len(kinds)
  for ax, (field, label) in zip(axes, ((ADV, "adversarial"), (NAT, "natural"))):
    for i, kind in enumerate(kinds):
      s = _stats(cells, kind, lambda c: c["target_width"], field)
      xs = [j + (i - (len(kinds) - 1) / 2) * bar for j, t in enumerate(targets) if t in s]
      ax.bar(xs, [100 * s[t].mean for t in targets if t in s], bar,
             yerr=[100 * s[t].spread for t in targets if t in s], capsize=3, label=kind)
    ax.set_xticks(range(len(targets)), [f"w={t} size" for t in targets])
    ax.set(ylabel=f"{label} accuracy %", title=f"{label}, equal parameter count")
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=8)
  fig.savefig(path, dpi=100)
  return path


# ------------------------------------------------------------------------------- report

def _cell_table(cells: list[dict]) -> list[str]:
  lines = ["| cell | status | stage | natural % | adversarial % | PGD % | nonzero params | "
           "compression | stages' wall s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in cells:
    r = c["results"]
    if r:
      lines.append(f"| {c['name']} | {c['status']} | {r['stage']} | "
                   f"{100 * r[NAT]:.1f} | {100 * r[ADV]:.1f} | "
                   f"{100 * r.get('pgd_accuracy', r[ADV]):.1f} | {r['nonzero_params']} | "
                   f"{r['compression']:.1f}x | {r['wall_time_s']:.0f} |")
    else:
      lines.append(f"| {c['name']} | {c['status']}: {c['error'] or ''} | | | | | | | |")
  return lines


def render(summary: dict[str, Any], plots: dict[str, str | None]) -> str:
  """report.md's text for a study.json `summary` and the plot files written."""
  cells, config = summary["cells"], summary["config"]
  run = config["run"]
  evaluations = sorted({c["results"]["evaluation"] for c in cells if c["results"]})
  lines = [f"# Study: {run['data']['name']}, {run['model']['name']}, seeds "
           f"{', '.join(map(str, config['seeds']))}", "",
           f"Robust (\"adversarial\") accuracy: {'; '.join(evaluations) or 'no cell finished'} "
           "(`robust_eval` of the study config; with it off, the PGD evaluation each run wrote "
           "to its report.json). Natural accuracy: the whole test split; the cell table also "
           "gives each run's own PGD accuracy on the whole test split. Numbers: test accuracy %, "
           "mean ± sample standard "
           "deviation over seeds (n = seeds). Holds? " + RULE + ".", ""]
  finished = sum(c["status"] == "finished" for c in cells)
  busy = sum(c["results"]["wall_time_s"] for c in cells if c["results"])
  attacking = sum(c["results"].get("evaluation_wall_time_s", 0) for c in cells if c["results"])
  lines += [f"{finished} of {len(cells)} cells finished; their training loops (without "
            f"compilation and setup) add up to {busy / 60:.1f} minutes"
            + (f", their robust evaluations to {attacking / 60:.1f} minutes" if attacking else "")
            + (f" (this invocation of the study: {summary['wall_time_s'] / 60:.1f} minutes)."
               if "wall_time_s" in summary else "."), ""]
  for i, (title, claim, rows_fn, plot_name) in enumerate(FINDINGS, 1):
    lines += [f"## {i}. {title}", "", f"Paper: {claim}", "",
              "| claim | measured here (mean ± spread, seeds) | holds? |",
              "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows_fn(cells)]
    if plots.get(plot_name):
      lines += ["", f"![{title}](plots/{plot_name})"]
    lines.append("")
  lines += ["## Cells", "", "Each cell is an ordinary run in `cells/<cell>/` (its report.json, "
            "metrics.jsonl, TensorBoard events, plots).", ""] + _cell_table(cells)
  return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], workdir: str) -> str:
  """Writes `workdir`/plots/*.png and `workdir`/report.md; returns report.md's path."""
  plot_dir = os.path.join(workdir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  cells = summary["cells"]
  plots = {name: fn(cells, os.path.join(plot_dir, name)) for name, fn in (
      ("capacity.png", plot_capacity), ("schemes.png", plot_schemes),
      ("pruned_scratch_inherited.png", plot_pruned_scratch_inherited))}
  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write(render(summary, plots))
  os.replace(path + ".tmp", path)
  return path
