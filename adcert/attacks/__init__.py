"""Attacks used by training methods and evaluation: L-inf PGD (gradients w.r.t. the input only)
and the frozen batch-norm context that makes attack passes use a step's clean-batch statistics."""
from adcert.attacks.bn import frozen_bn
from adcert.attacks.pgd import pgd_attack

__all__ = ["pgd_attack", "frozen_bn"]
