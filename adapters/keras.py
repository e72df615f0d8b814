"""Keras 3 adapter: the ``SoftTopK`` layer (DFTopK) for the Keras JAX and PyTorch backends.

Keras 3 hands a layer the backend's own tensors (JAX arrays or tracers, torch
tensors), so the layer calls :func:`topk_core.dftopk` on them directly: the
JAX backend gets the closed-form ``jax.custom_jvp`` rules of
:mod:`topk_core.adapters.jax_adapter`, the PyTorch backend the closed-form
``torch.autograd.Function`` of :mod:`topk_core.adapters.torch_adapter`.
Keras never differentiates through the selection.  Other Keras backends
(TensorFlow, NumPy, OpenVINO) have no such path here; constructing the layer
on them raises a ``ValueError`` that names the backend.

Importing ``topk_core`` does not import this module (nor Keras): import it as
``topk_core.adapters.keras`` (``pip install "topk-core[keras]"``).
"""

from __future__ import annotations

import math
from typing import Any

import keras

from .._layer_args import check_layer_args, check_learnable_tau

__all__ = ["SUPPORTED_BACKENDS", "SoftTopK"]

#: Keras backends whose tensors topk-core differentiates in closed form.
SUPPORTED_BACKENDS = ("jax", "torch")


def _check_backend() -> str:
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"topk_core.adapters.keras.SoftTopK runs on the Keras backends "
            f"{' and '.join(repr(b) for b in SUPPORTED_BACKENDS)}, but this Keras uses "
            f"{name!r}; set KERAS_BACKEND=jax or KERAS_BACKEND=torch before importing keras"
        )
    return name


def _check_learnable_tau(tau: float, dtype: str) -> None:
    """:func:`topk_core._layer_args.check_learnable_tau` in the weight's dtype."""
    import numpy as np

    value = float(np.exp(np.asarray(math.log(tau), dtype=dtype)))
    check_learnable_tau(tau, dtype, value, float(np.finfo(dtype).smallest_normal))


@keras.saving.register_keras_serializable(package="topk_core")
class SoftTopK(keras.layers.Layer):
    """Differentiable top-k layer (DFTopK): ``sigmoid((x - theta) / tau)``.

    ``theta`` lies halfway between the k-th and (k+1)-th largest entries along
    ``axis``; each output is the entry's soft membership in the top k.  O(n)
    forward and closed-form O(n) backward, on the Keras JAX and PyTorch
    backends (``model.fit``, ``jit_compile`` included).

    Parameters
    ----------
    k : int
        Number of entries to select (>= 0; at most the size of ``axis`` at
        call time).
    tau : float, default 1.0
        Temperature > 0 (the initial value when learnable).
    learnable_tau : bool, default False
        Learn the temperature: stored as the weight ``log_tau``, used as
        ``tau = exp(log_tau)``, so training keeps it positive.  An initial
        ``tau`` outside the normal range of the weight's dtype (float32:
        ``1.18e-38 <= tau <= 8.5e37``) is a ``ValueError``.
    output : {"probs", "logits"}, default "probs"
        Probabilities, or the logits ``(x - theta) / tau`` (for a
        ``BinaryCrossentropy(from_logits=True)``).  Masked entries give 0
        (``-inf`` logits).
    hard : bool, default False
        Straight-through: the output is the hard top-k mask (exactly
        ``min(k, n_valid)`` ones per row, ties by lower index), differentiated
        as the soft probabilities.  Needs ``output="probs"``.
    axis : int, default -1
        Axis along which to select.
    largest : bool, default True
        Select the k largest (True) or the k smallest (False).
    **kwargs
        Passed to ``keras.layers.Layer`` (``name``, ``dtype``, ...).

    Notes
    -----
    ``call(inputs, mask=None, k=None)`` takes a boolean ``mask`` broadcastable
    to the inputs (True = valid); Keras' own propagated masks also reach it.  A
    mask with one dimension fewer than the inputs follows Keras' per-timestep
    convention instead: it applies to every entry of the last axis (so for
    square inputs it differs from broadcasting; give the inputs' rank to
    broadcast).  The layer consumes the mask (``compute_mask`` is None).  ``k``
    overrides the layer's ``k`` for one call (an int or a per-row integer
    tensor); :meth:`hard_mask` gives the matching hard mask.  With a mask and
    ``output="logits"`` the masked logits are ``-inf``, where Keras'
    ``BinaryCrossentropy(from_logits=True)`` gives NaN (``-inf * 0``): train
    masked rows on ``"probs"`` or replace those logits first.  ``get_config``
    holds the constructor arguments (``tau`` is the initial value); a learned
    ``log_tau`` is saved with the weights (``model.save``).

    Examples
    --------
    >>> import keras
    >>> import numpy as np
    >>> from topk_core.adapters.keras import SoftTopK
    >>> p = SoftTopK(2, tau=0.5)(np.array([[4.0, 1.0, 3.0, 2.0]]))
    >>> np.round(keras.ops.convert_to_numpy(p).astype(float), 3).tolist()
    [[0.953, 0.047, 0.731, 0.269]]
    >>> m = SoftTopK(2, hard=True)(np.array([[4.0, 1.0, 3.0, 3.0]]))
    >>> keras.ops.convert_to_numpy(m).tolist()
    [[1.0, 0.0, 1.0, 0.0]]
    """

    def __init__(
        self,
        k: int,
        tau: float = 1.0,
        learnable_tau: bool = False,
        output: str = "probs",
        hard: bool = False,
        axis: int = -1,
        largest: bool = True,
        **kwargs: Any,
    ) -> None:
        _check_backend()
        args = check_layer_args(k, tau, learnable_tau, axis, largest, output, hard)
        super().__init__(**kwargs)
        self.k = args.k
        self.tau_init = args.tau
        self.learnable_tau = args.learnable_tau
        self.output_kind = args.output  # Layer.output is the symbolic output
        self.hard = args.hard
        self.axis = args.axis
        self.largest = args.largest
        self.supports_masking = True
        self.log_tau = None
        if learnable_tau:
            _check_learnable_tau(self.tau_init, self.variable_dtype)
            # no dependence on the input shape: created here, so a loaded model finds it
            self.log_tau = self.add_weight(
                name="log_tau",
                shape=(),
                initializer=keras.initializers.Constant(math.log(self.tau_init)),
                trainable=True,
            )
        self.built = True

    @property
    def tau(self) -> Any:
        """The temperature: a float, or ``exp(log_tau)`` (a backend tensor) when learnable."""
        if self.log_tau is None:
            return self.tau_init
        return keras.ops.exp(self.log_tau)

    def call(self, inputs: Any, mask: Any = None, k: Any = None) -> Any:
        from topk_core import dftopk, dftopk_logits

        k = self._k_for(k)
        mask = self._mask_for(inputs, mask)
        tau = self.tau
        if not isinstance(tau, float):
            tau = keras.ops.convert_to_tensor(tau)  # the backend's own tensor
        kw = dict(tau=tau, axis=self.axis, mask=mask, largest=self.largest)
        if self.output_kind == "logits":
            return dftopk_logits(inputs, k, **kw)
        return dftopk(inputs, k, hard=self.hard, **kw)

    def hard_mask(self, inputs: Any, mask: Any = None, k: Any = None) -> Any:
        """The matching hard 0/1 top-k mask (:func:`topk_core.topk_mask`), e.g. for labels.

        ``mask`` and ``k`` as in :meth:`call`; not differentiable.
        """
        from topk_core import topk_mask

        inputs = keras.ops.convert_to_tensor(inputs)  # as Layer.__call__ does for call
        k = self._k_for(k)
        mask = self._mask_for(inputs, mask)
        return topk_mask(inputs, k, axis=self.axis, mask=mask, largest=self.largest)

    def _k_for(self, k: Any) -> Any:
        """The call's ``k``: the layer's, an int, or a per-row array as a backend tensor."""
        if k is None:
            return self.k
        if hasattr(k, "shape") and hasattr(k, "dtype"):
            return keras.ops.convert_to_tensor(k)  # e.g. a NumPy array: one library with x
        return k

    @staticmethod
    def _mask_for(inputs: Any, mask: Any) -> Any:
        """The mask as ``topk_core`` takes it: Keras' per-timestep masks get the last axis."""
        if mask is None:
            return None
        if not hasattr(mask, "shape"):
            raise TypeError(
                f"mask must be a boolean tensor or array (True = valid), got {type(mask).__name__}"
            )
        mask = keras.ops.convert_to_tensor(mask)  # e.g. a NumPy array: one library with x
        x_shape, m_shape = tuple(inputs.shape), tuple(mask.shape)
        if len(m_shape) != len(x_shape) - 1:
            return mask
        # Keras' convention (what an Embedding(mask_zero=True) passes on): one dimension
        # fewer, per timestep, applied to the whole last axis
        lead = x_shape[:-1]
        fits = all(
            m in (1, None) or d in (1, None) or m == d for m, d in zip(m_shape[::-1], lead[::-1])
        )
        if not fits:
            raise ValueError(
                f"mask of shape {m_shape} has one dimension fewer than the inputs {x_shape}: "
                f"Keras' per-timestep convention applies it to the whole last axis, so it must "
                f"broadcast to {lead}; give a mask of the inputs' rank to broadcast it as "
                f"topk_core.dftopk does"
            )
        return keras.ops.expand_dims(mask, -1)

    def compute_mask(self, inputs: Any, mask: Any = None) -> None:
        # the mask is consumed (masked entries are 0, or -inf logits): passing it on
        # would make Keras weight the loss with it, whose shape it does not fit
        return None

    def compute_output_shape(self, input_shape: Any) -> Any:
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"axis {self.axis} is out of range for inputs of shape {tuple(input_shape)}"
            )
        n = input_shape[self.axis]
        if n is not None and self.k > n:
            raise ValueError(
                f"k must satisfy 0 <= k <= {n} (the size of axis {self.axis} of the inputs "
                f"{tuple(input_shape)}), got {self.k}"
            )
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            k=self.k,
            tau=self.tau_init,
            learnable_tau=self.learnable_tau,
            output=self.output_kind,
            hard=self.hard,
            axis=self.axis,
            largest=self.largest,
        )
        return config
