"""Adversarial attacks, one per module, on one shared geometry (`attacks.geometry`).

- `pgd`: PGD-Linf, PGD-L2 and FGSM, the training and quick-evaluation attacks;
- `apgd`, `fab`, `square`: AutoAttack's members (APGD-CE/DLR, APGD-T, FAB-T, Square);
- `cascade`: AutoAttack's cascade and the registry of attacks by name (`by_name`).

Every attack is a pure, jittable function `attack(apply_fn, params, x, y, key, *, eps, ...)`;
the conventions are in `admm_jax.attacks.geometry`'s docstring.
"""
from admm_jax.attacks.apgd import (APGD_LOSSES, apgd, apgd_checkpoints, apgd_targeted, dlr_loss,
                                   targeted_dlr_loss)
from admm_jax.attacks.cascade import (ATTACK_NAMES, CLEAN_MISCLASSIFIED, NEVER_BROKEN,
                                      STANDARD_NAMES, AttackFn, CascadeResult, autoattack,
                                      by_name, cascade)
from admm_jax.attacks.fab import fab
from admm_jax.attacks.geometry import NORMS, ApplyFn, Box, LossFn
from admm_jax.attacks.pgd import fgsm, pgd_l2, pgd_linf
from admm_jax.attacks.square import square

__all__ = ["APGD_LOSSES", "ATTACK_NAMES", "AttackFn", "ApplyFn", "Box", "CLEAN_MISCLASSIFIED",
           "CascadeResult", "LossFn", "NEVER_BROKEN", "NORMS", "STANDARD_NAMES", "apgd",
           "apgd_checkpoints", "apgd_targeted", "autoattack", "by_name", "cascade", "dlr_loss",
           "fab", "fgsm", "pgd_l2", "pgd_linf", "square", "targeted_dlr_loss"]
