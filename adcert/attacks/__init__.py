"""Attacks used by training methods and evaluation: L-inf PGD (gradients w.r.t. the input only),
EDAC's less-certain adversarial examples (:mod:`adcert.attacks.edac`), and the frozen batch-norm
context that makes attack passes use a step's clean-batch statistics."""
from adcert.attacks.bn import frozen_bn, shared_bn
from adcert.attacks.edac import adversarial_certainty, edac_attack, edac_lookahead
from adcert.attacks.pgd import margin_loss, pgd_attack

__all__ = ["pgd_attack", "margin_loss", "frozen_bn", "shared_bn", "edac_attack", "edac_lookahead",
           "adversarial_certainty"]
