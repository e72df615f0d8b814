"""topk-core: the differentiable top-k operator DFTopK for any array library.

DFTopK (Zhu et al., arXiv 2510.11472) turns scores into soft top-k membership
probabilities ``p = sigmoid((x - theta) / tau)``, ``theta`` halfway between the
k-th and (k+1)-th largest score, in O(n) with a closed-form O(n) gradient.

Importing this package imports no framework: backends are loaded from the
type of the array you pass, the first time you pass one.
"""

from ._api import (
    dftopk,
    dftopk_and_vjp,
    dftopk_jvp,
    dftopk_logits,
    dftopk_vjp,
    topk_mask,
    topk_threshold,
)
from ._registry import Backend, register_backend
from .losses import cascade_joint_loss, topk_bce_loss

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "__version__",
    "cascade_joint_loss",
    "dftopk",
    "dftopk_and_vjp",
    "dftopk_jvp",
    "dftopk_logits",
    "dftopk_vjp",
    "register_backend",
    "topk_bce_loss",
    "topk_mask",
    "topk_threshold",
]
