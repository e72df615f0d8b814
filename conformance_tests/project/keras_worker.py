"""Subprocess body of ``test_keras.py``: one Keras backend per process.

Keras fixes its backend at import (``KERAS_BACKEND``), so the test runs this
module once per backend: ``python -m conformance_tests.project.keras_worker OUT_DIR``.
It trains a small model with three ``SoftTopK`` heads (learnable-tau
probabilities, logits, straight-through hard) in ``model.fit``, compares every
head with ``topk_core`` on the same weights, checks the hard head's gradient
against ``dftopk_vjp(..., hard=True)``, Keras masks, ``get_config`` /
``from_config``, ``model.save`` / ``keras.models.load_model`` and the
module's docstring examples, and prints one JSON line of results.  On a
backend topk-core cannot serve it checks the error instead.  Keras is
imported inside :func:`main` only: the test collection must not import it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def main(out_dir: str) -> dict:
    start = time.perf_counter()
    import topk_core

    topk_core.dftopk(np.ones(4), 2)
    import topk_core.adapters

    assert "keras" not in sys.modules, "import topk_core imported keras"
    import keras
    from topk_core.adapters.keras import SUPPORTED_BACKENDS, SoftTopK

    backend = keras.backend.backend()
    assert backend == os.environ["KERAS_BACKEND"], (backend, os.environ["KERAS_BACKEND"])
    if backend not in SUPPORTED_BACKENDS:
        try:
            SoftTopK(3)
        except ValueError as exc:
            return {"backend": backend, "error": str(exc)}
        raise AssertionError(f"SoftTopK(3) on the {backend!r} backend did not raise")

    import doctest

    import topk_core.adapters.keras as module

    doc = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert doc.attempted > 0 and doc.failed == 0, doc

    keras.utils.set_random_seed(20251011)
    rng = np.random.default_rng(20251011)
    n, d, k, batch = 12, 4, 3, 64
    feats = rng.standard_normal((batch, n, d)).astype(np.float32)
    relevance = feats @ rng.standard_normal(d)
    labels = topk_core.topk_mask(relevance, k).astype(np.float32)

    inp = keras.Input((n, d))
    scores = keras.layers.Reshape((n,))(keras.layers.Dense(1, name="score")(inp))
    heads = {
        "probs": SoftTopK(k, tau=1.0, learnable_tau=True, name="probs")(scores),
        "logits": SoftTopK(k, tau=0.5, output="logits", name="logits")(scores),
        "hard": SoftTopK(k, tau=0.5, hard=True, name="hard")(scores),
    }
    model = keras.Model(inp, heads)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss={
            "probs": "binary_crossentropy",
            "logits": keras.losses.BinaryCrossentropy(from_logits=True),
            "hard": "mean_squared_error",
        },
    )
    kernel0 = np.array(model.get_layer("score").kernel.numpy())
    hist = model.fit(
        feats, {h: labels for h in heads}, epochs=6, batch_size=16, verbose=0, shuffle=False
    )
    losses = hist.history["loss"]
    assert losses[-1] < 0.8 * losses[0], f"training did not reduce the loss: {losses}"
    assert not np.allclose(model.get_layer("score").kernel.numpy(), kernel0)

    # the same weights through topk_core (float64 NumPy)
    kernel = np.asarray(model.get_layer("score").kernel.numpy(), dtype=np.float64)
    bias = np.asarray(model.get_layer("score").bias.numpy(), dtype=np.float64)
    s64 = (feats.astype(np.float64) @ kernel + bias)[..., 0]
    log_tau = float(np.asarray(model.get_layer("probs").log_tau.numpy()))
    assert abs(log_tau) > 1e-3, "the learnable temperature did not train"
    pred = {h: np.asarray(v, dtype=np.float64) for h, v in model.predict(feats, verbose=0).items()}
    err = {
        "probs": float(
            np.abs(pred["probs"] - topk_core.dftopk(s64, k, tau=math.exp(log_tau))).max()
        ),
        "logits": float(
            np.abs(pred["logits"] - topk_core.dftopk_logits(s64, k, tau=0.5)).max()
            / max(1.0, np.abs(pred["logits"]).max())
        ),
    }
    assert err["probs"] < 1e-4 and err["logits"] < 1e-4, err
    # the hard head is exactly topk_mask of the scores Keras computed
    s32 = keras.ops.convert_to_numpy(keras.Model(inp, scores)(feats))
    np.testing.assert_array_equal(pred["hard"], topk_core.topk_mask(s32, k))
    assert (pred["hard"].sum(-1) == k).all()

    # gradient of the hard layer: the soft p's closed form
    x = rng.standard_normal((5, n)).astype(np.float32)
    c = rng.standard_normal((5, n)).astype(np.float32)
    hard_layer = SoftTopK(k, tau=0.7, hard=True)
    gx = _grad(backend, lambda t: keras.ops.sum(keras.ops.convert_to_tensor(c) * hard_layer(t)), x)
    want, _ = topk_core.dftopk_vjp(
        x.astype(np.float64), k, c.astype(np.float64), tau=0.7, hard=True
    )
    err["hard_grad"] = float(np.abs(gx - want).max())
    assert err["hard_grad"] < 1e-5, err

    # masks: explicit, and Keras' one-dimension-fewer convention
    valid = rng.random((5, n)) > 0.3
    got = keras.ops.convert_to_numpy(SoftTopK(k)(x, mask=keras.ops.convert_to_tensor(valid)))
    np.testing.assert_allclose(got, topk_core.dftopk(x, k, mask=valid), atol=1e-6)
    rows = rng.random(5) > 0.5
    got = keras.ops.convert_to_numpy(SoftTopK(1, axis=0)(x, mask=keras.ops.convert_to_tensor(rows)))
    np.testing.assert_allclose(
        got, topk_core.dftopk(x, 1, axis=0, mask=np.broadcast_to(rows[:, None], x.shape)), atol=1e-6
    )

    # a full-shape mask in model.fit with a Keras loss: the layer consumes the mask
    # (it used to pass it on, and Keras weighted the loss with it: a shape error)
    xi, mi = keras.Input((n,)), keras.Input((n,), dtype="bool")
    mm = keras.Model([xi, mi], SoftTopK(k)(keras.layers.Dense(n)(xi), mask=mi))
    mm.compile(optimizer="adam", loss="binary_crossentropy")
    mlosses = mm.fit([x, valid], (x > 0).astype(np.float32), epochs=2, verbose=0).history["loss"]
    assert all(math.isfinite(v) for v in mlosses), mlosses
    assert SoftTopK(k).compute_mask(x, valid) is None
    # per-call k (int or per-row) and hard_mask, NumPy arguments converted like inputs
    layer = SoftTopK(k, tau=0.5)
    k_rows = np.array([0, 1, 3, n, 2])
    for kk in (1, k_rows):
        got = keras.ops.convert_to_numpy(layer(x, k=kk))
        np.testing.assert_allclose(got, topk_core.dftopk(x, kk, tau=0.5), atol=1e-6)
        hm = keras.ops.convert_to_numpy(layer.hard_mask(x, mask=valid, k=kk))
        np.testing.assert_array_equal(hm, topk_core.topk_mask(x, kk, mask=valid))
    # clear errors: a per-timestep mask that does not fit, a mask that is no array, a k
    # above the axis when the model is built, a learnable tau float32 cannot hold
    errors = []
    for exc, text, fn in (
        (ValueError, "one dimension fewer", lambda: SoftTopK(1)(x, mask=np.ones(n, bool))),
        (TypeError, "mask must be a boolean tensor", lambda: SoftTopK(1)(x, mask=[[True] * n])),
        (ValueError, "k must satisfy 0 <= k <= 12", lambda: SoftTopK(13)(keras.Input((n,)))),
        (ValueError, "its float32 weight", lambda: SoftTopK(1, 1e-39, learnable_tau=True)),
    ):
        try:
            fn()
        except exc as e:
            assert text in str(e), (text, str(e))
            errors.append(text)
        else:
            raise AssertionError(f"no {exc.__name__} ({text})")

    # config round trip, save / load without custom_objects
    for layer in (model.get_layer(h) for h in heads):
        config = layer.get_config()
        assert SoftTopK.from_config(config).get_config() == config
    path = os.path.join(out_dir, f"model-{backend}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    again = {h: np.asarray(v) for h, v in loaded.predict(feats, verbose=0).items()}
    for h in heads:
        np.testing.assert_allclose(again[h], pred[h], atol=1e-6, rtol=0)
    assert float(np.asarray(loaded.get_layer("probs").log_tau.numpy())) == log_tau
    # jit_compile=True: XLA on JAX, torch.compile (dynamo + inductor) on torch
    inp2 = keras.Input((n, d))
    s2 = keras.layers.Reshape((n,))(keras.layers.Dense(1, name="score2")(inp2))
    jm = keras.Model(inp2, SoftTopK(k, tau=1.0, learnable_tau=True, name="jit")(s2))
    jm.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy", jit_compile=True)
    jit_losses = jm.fit(feats, labels, epochs=4, batch_size=16, verbose=0, shuffle=False).history[
        "loss"
    ]
    assert jm.jit_compile is True, "Keras did not keep jit_compile=True"
    assert jit_losses[-1] < 0.8 * jit_losses[0], f"jit_compile: no training: {jit_losses}"
    kernel2 = np.asarray(jm.get_layer("score2").kernel.numpy(), dtype=np.float64)
    bias2 = np.asarray(jm.get_layer("score2").bias.numpy(), dtype=np.float64)
    tau2 = math.exp(float(np.asarray(jm.get_layer("jit").log_tau.numpy())))
    want = topk_core.dftopk((feats.astype(np.float64) @ kernel2 + bias2)[..., 0], k, tau=tau2)
    err["jit_compile"] = float(np.abs(np.asarray(jm.predict(feats, verbose=0)) - want).max())
    assert err["jit_compile"] < 1e-4, err
    return {
        "backend": backend,
        "losses": [round(v, 5) for v in losses],
        "jit_losses": [round(v, 5) for v in jit_losses],
        "tau": math.exp(log_tau),
        "max_err": err,
        "errors": errors,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _grad(backend: str, f, x):
    """d f / d x of a scalar function of a backend tensor, as NumPy."""
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(f)(jax.numpy.asarray(x)))
    import torch

    t = torch.tensor(x, requires_grad=True)
    f(t).backward()
    return t.grad.numpy()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
