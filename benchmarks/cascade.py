"""End-to-end cascade benchmark: train a two-stage cascade with four losses.

``python -m benchmarks.cascade [--quick] [--seeds N] [--steps N] [--out DIR]``

Task (synthetic, known ground truth).  Each query is a user ``u`` with a
candidate list of 40-64 items ``v`` (variable length: a mask).  The true
utility is ``u^T A v + tanh(B u) . tanh(C v) / 2 + w^T v / 2`` (standardised);
the ground-truth set is the top-``k`` of each list by utility.  The cascade:

- stage 1 (retrieval): a two-tower model, ``score = f(u) . g(v)`` (two MLPs),
  keeps its top ``k1`` candidates;
- stage 2 (ranking): an MLP over ``[u, v, u * v]`` keeps the top ``k`` of
  those.

Metric: Recall@k of the cascade's final output on held-out lists
(``|final ∩ true top-k| / k``).  Both stages train jointly from one loss:

- ``dftopk``: :func:`topk_core.losses.cascade_joint_loss` (LCRON-style joint
  BCE on the product of DFTopK probabilities + per-stage top-k BCE, learned
  uncertainty weights), stage sizes ``(k1, k)``;
- ``lapsum``: the same objective with LapSum soft top-k probabilities
  (:mod:`benchmarks.lapsum`: Laplace-CDF mask with the exact threshold that
  makes it sum to k; BCE on probabilities clipped to ``[1e-6, 1 - 1e-6]``);
- ``bce``: pointwise BCE of each stage's scores against the relevance
  ``sigmoid(utility)``;
- ``softmax``: listwise softmax cross-entropy of each stage with its true
  top-``k_j`` items as positives.

Timing: wall time of one training step (forward, loss, backward, optimiser
update), median over the steps after a warm-up, one thread per framework.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cli import no_repeats

METHODS = ("dftopk", "lapsum", "bce", "softmax")
FRAMEWORKS = ("torch", "jax")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cascade"


@dataclass(frozen=True)
class Config:
    """Benchmark size and training hyper-parameters (identical for all methods)."""

    d: int = 8  # user / item feature size
    n_items: int = 2000  # catalogue
    list_min: int = 40
    list_max: int = 64
    k1: int = 20  # retrieval keeps k1
    k: int = 5  # ranking keeps k (the true top-k set)
    n_train: int = 4096
    n_test: int = 512
    batch: int = 32
    steps: int = 600
    eval_every: int = 50
    hidden: int = 32
    embed: int = 16
    lr: float = 3e-3
    tau: float = 1.0  # DFTopK temperature
    alpha: float = 1.0  # LapSum scale
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    frameworks: tuple[str, ...] = FRAMEWORKS
    warmup: int = 5  # steps excluded from the timing


QUICK = Config(n_train=2048, n_test=256, steps=150, eval_every=25, seeds=(0, 1, 2))


# ---------------------------------------------------------------------------
# data


def make_data(cfg: Config, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Train and test lists with features, mask, utility and relevance (float32)."""
    rng = np.random.default_rng(1000 + seed)
    d = cfg.d
    a = rng.standard_normal((d, d)) / math.sqrt(d)
    b = rng.standard_normal((8, d)) / math.sqrt(d)
    c = rng.standard_normal((8, d)) / math.sqrt(d)
    w = rng.standard_normal(d) / math.sqrt(d)
    catalogue = rng.standard_normal((cfg.n_items, d))

    def split(n: int) -> dict[str, np.ndarray]:
        u = rng.standard_normal((n, d))
        idx = rng.integers(0, cfg.n_items, size=(n, cfg.list_max))
        v = catalogue[idx]
        length = rng.integers(cfg.list_min, cfg.list_max + 1, size=n)
        mask = np.arange(cfg.list_max)[None, :] < length[:, None]
        util = np.einsum("nd,de,nle->nl", u, a, v)
        util += 0.5 * np.einsum("nh,nlh->nl", np.tanh(u @ b.T), np.tanh(v @ c.T))
        util += 0.5 * v @ w
        return {"u": u, "v": v, "mask": mask, "util": util}

    train, test = split(cfg.n_train), split(cfg.n_test)
    scale = train["util"][train["mask"]].std()
    for part in (train, test):
        part["util"] = part["util"] / scale
        part["rel"] = 1 / (1 + np.exp(-part["util"]))  # click probability, BCE target
        for key in ("u", "v", "util", "rel"):
            part[key] = part[key].astype(np.float32)
    return {"train": train, "test": test}


def init_params(cfg: Config, seed: int) -> dict[str, list[np.ndarray]]:
    """He-initialised MLP weights (float32), identical across methods and frameworks."""
    rng = np.random.default_rng(seed)

    def mlp(sizes: list[int]) -> list[np.ndarray]:
        out = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            out.append(rng.standard_normal((fan_in, fan_out)) * math.sqrt(2 / fan_in))
            out.append(np.zeros(fan_out))
        return [p.astype(np.float32) for p in out]

    d, h, e = cfg.d, cfg.hidden, cfg.embed
    return {
        "user": mlp([d, h, e]),
        "item": mlp([d, h, e]),
        "rank": mlp([3 * d, 2 * h, h, 1]),
    }


# ---------------------------------------------------------------------------
# model and losses, written once with Array API operations (torch and jax)


def _mlp(xp: Any, layers: list[Any], x: Any) -> Any:
    for i in range(0, len(layers), 2):
        x = xp.matmul(x, layers[i]) + layers[i + 1]
        if i + 2 < len(layers):
            x = xp.maximum(x, xp.zeros_like(x))
    return x


def forward(xp: Any, params: dict[str, Any], u: Any, v: Any) -> tuple[Any, Any]:
    """Stage scores ``(retrieval, ranking)``, each ``(batch, list)``."""
    fu = _mlp(xp, params["user"], u)  # (B, E)
    fv = _mlp(xp, params["item"], v)  # (B, L, E)
    s1 = xp.sum(fu[:, None, :] * fv, axis=-1)
    ub = xp.broadcast_to(u[:, None, :], v.shape)
    s2 = _mlp(xp, params["rank"], xp.concat([ub, v, ub * v], axis=-1))[..., 0]
    return s1, s2


def _softplus(xp: Any, t: Any) -> Any:
    return xp.maximum(t, xp.zeros_like(t)) + xp.log1p(xp.exp(-xp.abs(t)))


def _masked_mean(xp: Any, elem: Any, mask: Any) -> Any:
    elem = xp.where(mask, elem, xp.zeros_like(elem))
    return xp.sum(elem) / xp.sum(xp.astype(mask, elem.dtype))


def _bce_probs(xp: Any, p: Any, y: Any, mask: Any) -> Any:
    eps = 1e-6
    p = xp.clip(p, eps, 1 - eps)
    return _masked_mean(xp, -(y * xp.log(p) + (1 - y) * xp.log1p(-p)), mask)


def _kendall(xp: Any, terms: list[Any], log_vars: Any) -> Any:
    loss = 0.0
    for t, term in enumerate(terms):
        loss = loss + xp.exp(-log_vars[t]) * term + log_vars[t]
    return loss


def make_loss(method: str, framework: str, cfg: Config) -> Any:
    """``loss(xp, s1, s2, batch, log_vars) -> scalar`` for one method."""
    from topk_core import topk_mask
    from topk_core.losses import cascade_joint_loss

    k1, k = cfg.k1, cfg.k

    if method == "dftopk":

        def loss(xp, s1, s2, batch, log_vars):
            return cascade_joint_loss(
                [s1, s2],
                batch["util"],
                (k1, k),
                tau=cfg.tau,
                mask=batch["mask"],
                log_vars=log_vars,
            )

    elif method == "lapsum":
        from . import lapsum as lap

        soft = lap.lapsum_torch if framework == "torch" else lap.lapsum_jax

        def probs(xp, s, kk, mask):
            # LapSum has no mask: park masked entries 60 alpha below the row's
            # smallest valid score, where the Laplace CDF is ~1e-26
            big = xp.asarray(3e38, dtype=s.dtype)
            low = xp.min(xp.where(mask, s, big), axis=-1, keepdims=True)
            return soft(xp.where(mask, s, low - 60 * cfg.alpha), kk, cfg.alpha)

        def loss(xp, s1, s2, batch, log_vars):
            mask, util = batch["mask"], batch["util"]
            p1, p2 = probs(xp, s1, k1, mask), probs(xp, s2, k, mask)
            y1 = topk_mask(util, k1, mask=mask)
            y2 = topk_mask(util, k, mask=mask)
            terms = [
                _bce_probs(xp, p1 * p2, y2, mask),
                _bce_probs(xp, p1, y1, mask),
                _bce_probs(xp, p2, y2, mask),
            ]
            return _kendall(xp, terms, log_vars)

    elif method == "bce":

        def loss(xp, s1, s2, batch, log_vars):
            mask, rel = batch["mask"], batch["rel"]
            total = 0.0
            for s in (s1, s2):
                elem = rel * _softplus(xp, -s) + (1 - rel) * _softplus(xp, s)
                total = total + _masked_mean(xp, elem, mask)
            return total

    elif method == "softmax":

        def loss(xp, s1, s2, batch, log_vars):
            mask, util = batch["mask"], batch["util"]
            total = 0.0
            for s, kk in ((s1, k1), (s2, k)):
                y = topk_mask(util, kk, mask=mask)
                neg = xp.asarray(-1e30, dtype=s.dtype)
                sm = xp.where(mask, s, neg)
                top = xp.max(sm, axis=-1, keepdims=True)
                lse = top + xp.log(xp.sum(xp.exp(sm - top), axis=-1, keepdims=True))
                logp = sm - lse
                total = total - xp.mean(xp.sum(y * logp, axis=-1) / kk)
            return total

    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return loss


# ---------------------------------------------------------------------------
# evaluation: the hard cascade


def cascade_recall(
    s1: np.ndarray, s2: np.ndarray, util: np.ndarray, mask: np.ndarray, k1: int, k: int
) -> float:
    """Mean Recall@k of the hard cascade (top-k1 by s1, then top-k by s2)."""
    neg = -np.inf
    keep1 = np.argsort(-np.where(mask, s1, neg), axis=-1, kind="stable")[:, :k1]
    s2_kept = np.take_along_axis(s2, keep1, axis=-1)
    final = np.take_along_axis(keep1, np.argsort(-s2_kept, axis=-1, kind="stable")[:, :k], -1)
    truth = np.argsort(-np.where(mask, util, neg), axis=-1, kind="stable")[:, :k]
    hits = (final[:, :, None] == truth[:, None, :]).any(-1).sum(-1)
    return float(np.mean(hits / k))


# ---------------------------------------------------------------------------
# framework drivers


def _batches(cfg: Config, data: dict[str, np.ndarray], seed: int):
    rng = np.random.default_rng(seed + 77)
    n = data["u"].shape[0]
    while True:
        idx = rng.choice(n, size=cfg.batch, replace=False)
        yield {key: data[key][idx] for key in ("u", "v", "mask", "util", "rel")}


def run_torch(cfg: Config, method: str, seed: int, data: dict) -> dict[str, Any]:
    import array_api_compat.torch as xp
    import torch

    torch.manual_seed(seed)
    params = {
        name: [torch.tensor(p, requires_grad=True) for p in layers]
        for name, layers in init_params(cfg, seed).items()
    }
    log_vars = torch.zeros(3, requires_grad=True)
    trainable = [p for layers in params.values() for p in layers]
    if method in ("dftopk", "lapsum"):
        trainable.append(log_vars)
    opt = torch.optim.Adam(trainable, lr=cfg.lr)
    loss_fn = make_loss(method, "torch", cfg)
    test = {key: torch.from_numpy(np.ascontiguousarray(val)) for key, val in data["test"].items()}

    def evaluate() -> float:
        with torch.no_grad():
            s1, s2 = forward(xp, params, test["u"], test["v"])
        t = data["test"]
        return cascade_recall(s1.numpy(), s2.numpy(), t["util"], t["mask"], cfg.k1, cfg.k)

    curve, times, losses = [(0, evaluate())], [], []
    batches = _batches(cfg, data["train"], seed)
    for step in range(1, cfg.steps + 1):
        batch = {key: torch.from_numpy(val) for key, val in next(batches).items()}
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        s1, s2 = forward(xp, params, batch["u"], batch["v"])
        loss = loss_fn(xp, s1, s2, batch, log_vars)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, evaluate()))
    return {"curve": curve, "step_times": times, "final_loss": losses[-1]}


_JAX_STEPS: dict[tuple, Any] = {}


def run_jax(cfg: Config, method: str, seed: int, data: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    xp = jnp
    params = {
        name: [jnp.asarray(p) for p in layers] for name, layers in init_params(cfg, seed).items()
    }
    state = {"params": params, "log_vars": jnp.zeros(3, jnp.float32)}
    moments = jax.tree_util.tree_map(lambda p: (jnp.zeros_like(p), jnp.zeros_like(p)), state)
    learn_lv = method in ("dftopk", "lapsum")

    key = (method, cfg)
    if key not in _JAX_STEPS:
        loss_fn = make_loss(method, "jax", cfg)

        def objective(state, batch):
            s1, s2 = forward(xp, state["params"], batch["u"], batch["v"])
            return loss_fn(xp, s1, s2, batch, state["log_vars"])

        def step(state, moments, t, batch):
            # Adam (Kingma & Ba), the same update as torch.optim.Adam defaults
            loss, grads = jax.value_and_grad(objective)(state, batch)
            if not learn_lv:
                grads["log_vars"] = jnp.zeros_like(grads["log_vars"])
            b1, b2, eps = 0.9, 0.999, 1e-8

            def upd(p, g, m):
                m1 = b1 * m[0] + (1 - b1) * g
                m2 = b2 * m[1] + (1 - b2) * g * g
                mh = m1 / (1 - b1**t)
                vh = m2 / (1 - b2**t)
                return p - cfg.lr * mh / (jnp.sqrt(vh) + eps), (m1, m2)

            flat_p, tree = jax.tree_util.tree_flatten(state)
            flat_g = tree.flatten_up_to(grads)
            flat_m = tree.flatten_up_to(moments)
            out = [upd(p, g, m) for p, g, m in zip(flat_p, flat_g, flat_m)]
            new_state = tree.unflatten([o[0] for o in out])
            new_moments = tree.unflatten([o[1] for o in out])
            return new_state, new_moments, loss

        @jax.jit
        def scores(params, u, v):
            return forward(xp, params, u, v)

        _JAX_STEPS[key] = (jax.jit(step), scores)
    step_fn, scores_fn = _JAX_STEPS[key]
    test = data["test"]

    def evaluate() -> float:
        s1, s2 = scores_fn(state["params"], test["u"], test["v"])
        return cascade_recall(
            np.asarray(s1), np.asarray(s2), test["util"], test["mask"], cfg.k1, cfg.k
        )

    curve, times, losses = [(0, evaluate())], [], []
    batches = _batches(cfg, data["train"], seed)
    for step in range(1, cfg.steps + 1):
        batch = {key: jnp.asarray(val) for key, val in next(batches).items()}
        t0 = time.perf_counter()
        state, moments, loss = step_fn(state, moments, jnp.float32(step), batch)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, evaluate()))
    return {"curve": curve, "step_times": times, "final_loss": losses[-1]}


# ---------------------------------------------------------------------------
# the run, report, plot


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "jax"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = mod.__version__
    return out


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train every framework x method x seed; per method the recall and step time.

    Parameters
    ----------
    cfg : Config
        The run; ``cfg.steps`` must exceed ``cfg.warmup``, the steps left out of
        the timing.
    progress : bool, optional
        Print one line per run to stderr.

    Returns
    -------
    dict
        The report: config, per-framework per-method results, versions, machine.
        ``recall_std`` and ``curve_std`` are the sample standard deviations over
        seeds, None for a single seed (where they are undefined).
    """
    if cfg.steps <= cfg.warmup:
        raise ValueError(
            f"steps must be > warmup ({cfg.warmup}): the warm-up steps are left out of "
            f"the timing, got steps={cfg.steps}"
        )
    results: dict[str, Any] = {}
    runners = {"torch": run_torch, "jax": run_jax}
    data = {seed: make_data(cfg, seed) for seed in cfg.seeds}
    t_start = time.perf_counter()
    for fw in cfg.frameworks:
        for method in cfg.methods:
            runs = []
            for seed in cfg.seeds:
                t0 = time.perf_counter()
                r = runners[fw](cfg, method, seed, data[seed])
                runs.append(r)
                if progress:
                    print(
                        f"  {fw:5s} {method:8s} seed {seed}: recall {r['curve'][-1][1]:.3f}  "
                        f"step {1e3 * np.median(r['step_times'][cfg.warmup :]):.2f} ms  "
                        f"({time.perf_counter() - t0:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            steps = [s for s, _ in runs[0]["curve"]]
            curves = np.array([[r for _, r in run["curve"]] for run in runs])
            finals = curves[:, -1]
            step_ms = [1e3 * float(np.median(r["step_times"][cfg.warmup :])) for r in runs]
            results.setdefault(fw, {})[method] = {
                "recall_mean": float(finals.mean()),
                # sample std (ddof=1): undefined for one seed, so None, not 0
                "recall_std": float(finals.std(ddof=1)) if len(runs) > 1 else None,
                "recall_per_seed": finals.tolist(),
                "step_ms_median": float(np.median(step_ms)),
                "step_ms_per_seed": step_ms,
                "curve_steps": steps,
                "curve_mean": curves.mean(0).tolist(),
                "curve_std": curves.std(0, ddof=1).tolist() if len(runs) > 1 else None,
                "final_loss_per_seed": [r["final_loss"] for r in runs],
            }
    from topk_core._registry import get_backend

    return {
        "config": asdict(cfg),
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
        "versions": _versions(),
        "dftopk_backends": {fw: get_backend(fw).name for fw in cfg.frameworks},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "threads": "torch.set_num_threads(1); XLA_FLAGS single-threaded Eigen; "
        "numpy_soft.set_num_threads(1)",
    }


def _mean_std(mean: float, std: float | None) -> str:
    """``"0.745 ± 0.012"``, or ``"0.745 ± n/a"`` when the std is undefined (one seed).

    Examples
    --------
    >>> _mean_std(0.7449, 0.0123), _mean_std(0.7449, None)
    ('0.745 ± 0.012', '0.745 ± n/a')
    """
    return f"{mean:.3f} ± " + ("n/a" if std is None else f"{std:.3f}")


def markdown(report: dict[str, Any]) -> str:
    """The results table and a note on the setup (Markdown).

    Parameters
    ----------
    report : dict
        What :func:`run` returns.

    Returns
    -------
    str
        One row per method: Recall@k mean ± sample std over seeds (``n/a`` for a
        single seed) and the median ms per step, for each framework.
    """
    cfg = report["config"]
    res = report["results"]
    fws = list(res)
    head = "| loss | " + " | ".join(f"{fw} Recall@{cfg['k']} | {fw} ms/step" for fw in fws) + " |"
    sep = "|---|" + "---:|---:|" * len(fws)
    rows = [head, sep]
    for method in cfg["methods"]:
        cells = []
        for fw in fws:
            r = res[fw][method]
            cells.append(_mean_std(r["recall_mean"], r["recall_std"]))
            cells.append(f"{r['step_ms_median']:.2f}")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = list(cfg["seeds"])
    spread = (
        f"mean ± sample std over seeds {seeds}"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}), so no sample std (n/a)"
    )
    note = (
        f"\nRecall@{cfg['k']} of the hard cascade (top-{cfg['k1']} by retrieval, then "
        f"top-{cfg['k']} by ranking) on {cfg['n_test']} held-out lists of "
        f"{cfg['list_min']}-{cfg['list_max']} candidates after {cfg['steps']} steps "
        f"(batch {cfg['batch']}); {spread}. "
        f"ms/step: median wall time of one training step (forward, loss, backward, Adam), "
        f"median over seeds, one thread per framework, on a shared CPU "
        f"({report['machine']}); total run {report['total_seconds']:.0f} s.\n"
    )
    return "\n".join(rows) + "\n" + note


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    cfg = report["config"]
    fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 4), squeeze=False)
    for ax, (fw, methods) in zip(axes[0], res.items()):
        for method, r in methods.items():
            x = np.array(r["curve_steps"])
            m = np.array(r["curve_mean"])
            ax.plot(x, m, label=method)
            if r["curve_std"] is not None:  # no band for a single seed
                s = np.array(r["curve_std"])
                ax.fill_between(x, m - s, m + s, alpha=0.2)
        ax.set_title(f"{fw}: two-stage cascade")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"held-out Recall@{cfg['k']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _single_thread() -> None:
    # one thread per framework: a fair, reproducible timing on a shared machine
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    from topk_core.backends.numpy_soft import set_num_threads

    set_num_threads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _csv(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma list of {allowed}, got {text!r}")
    try:
        return tuple(no_repeats(list(items), what))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cascade",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small run (~1-2 min on 2 cores): 150 steps, 3 seeds"
    )
    parser.add_argument(
        "--seeds", type=int, help="number of seeds (0..N-1), >= 1; one seed gives no std"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"training steps per run, > {Config.warmup} (warm-up steps, left out of the timing)",
    )
    parser.add_argument("--methods", type=lambda t: _csv(t, METHODS, "--methods"))
    parser.add_argument("--frameworks", type=lambda t: _csv(t, FRAMEWORKS, "--frameworks"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else Config()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        # the first cfg.warmup steps are left out of ms/step: fewer would leave no timing
        if args.steps <= cfg.warmup:
            parser.error(
                f"--steps must be > {cfg.warmup} (the first {cfg.warmup} steps are warm-up, "
                f"left out of the ms/step timing), got {args.steps}"
            )
        cfg = replace(cfg, steps=args.steps, eval_every=max(1, min(cfg.eval_every, args.steps)))
    if args.methods:
        cfg = replace(cfg, methods=args.methods)
    if args.frameworks:
        cfg = replace(cfg, frameworks=args.frameworks)

    _single_thread()
    report = run(cfg)
    report["quick"] = bool(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "results.md").write_text(table)
    if not args.no_plot:
        plot(report, args.out / "recall_vs_step.png")
    print(table)
    print(
        f"wrote {args.out}/results.json, results.md"
        + ("" if args.no_plot else ", recall_vs_step.png")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
