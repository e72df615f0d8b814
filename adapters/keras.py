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

from .._layer_args import check_layer_args

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
        ``tau = exp(log_tau)``, so training keeps it positive.
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
    ``call(inputs, mask=None)`` takes a boolean ``mask`` broadcastable to the
    inputs (True = valid); Keras' own propagated masks also reach it.  A mask
    with one dimension fewer than the inputs (Keras' per-timestep convention)
    is applied to every entry of the last axis.  ``get_config`` holds the
    constructor arguments (``tau`` is the initial value); a learned
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

    def call(self, inputs: Any, mask: Any = None) -> Any:
        from topk_core import dftopk, dftopk_logits

        if mask is not None and len(mask.shape) == len(inputs.shape) - 1:
            mask = keras.ops.expand_dims(mask, -1)
        tau = self.tau
        if not isinstance(tau, float):
            tau = keras.ops.convert_to_tensor(tau)  # the backend's own tensor
        kw = dict(tau=tau, axis=self.axis, mask=mask, largest=self.largest)
        if self.output_kind == "logits":
            return dftopk_logits(inputs, self.k, **kw)
        return dftopk(inputs, self.k, hard=self.hard, **kw)

    def compute_output_shape(self, input_shape: Any) -> Any:
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
