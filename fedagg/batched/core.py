"""Batched local training: ``k`` clients from the same weights in one computation.

Client ``i`` trains the trainable parameters ``θ_i`` (stacked into tensors of shape ``(k, *shape)``;
frozen parameters and buffers are shared) with exactly the update of
:func:`fedagg.training.local_sgd`. At its step ``t`` it draws the minibatch ``I_{i,t}`` that
:func:`fedagg.training.minibatches` yields from its own generator (``b_i = min(n_i, batch_size_i)``
samples) and takes

.. math::

    L_{i,t} &= \\frac{1}{b_i} \\sum_{j \\in I_{i,t}} \\ell(f(x_j; θ_i), y_j) \\\\
    g &= \\nabla_{θ_i} L_{i,t} + μ_i (θ_i - θ^0) \\qquad \\text{(FedProx)} \\\\
    g &\\leftarrow g \\cdot \\min\\Big(1, \\frac{c_i}{\\lVert g\\rVert_2 + 10^{-6}}\\Big)
        \\qquad \\text{(clipping over all of } θ_i\\text{, if } c_i \\text{ is set)} \\\\
    d &= g + λ_i θ_i, \\quad v \\leftarrow d \\ (t = 0), \\quad v \\leftarrow m_i v + d \\ (t > 0),
        \\quad θ_i \\leftarrow θ_i - η_i v

(``torch.optim.SGD`` with momentum ``m_i``, weight decay ``λ_i``, no dampening, no Nesterov). One
backward pass of ``Σ_i L_{i,t}`` gives every client its own gradient, since the clients share no
trainable tensor. Minibatches are gathered into ``(k, B, …)`` with ``B = max_i b_i``; the padded
samples (copies of the client's own first row) get zero weight. Clients are ordered by decreasing step
count, so at step ``t`` only the first ``m_t`` clients (those with more than ``t`` steps) compute.
Clients without data or with zero steps are not trained (loss ``nan``, weights unchanged).

The forward is :func:`fedagg.batched.layers.stacked_forward` when it knows the model, else
``torch.func.vmap`` over ``torch.func.functional_call`` (attention on its composite kernel).

Reproducibility: the same jobs give bit-identical results. Against the per-client path, and against
the same client batched with other clients, results agree to float32 rounding (about 1e-7 per step
here), not bit for bit: padding and the stacked kernels change the order of sums. So a caller that
needs bit-identical runs must form the same batches (chunks) every time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedagg.batched.layers import stacked_forward
from fedagg.ssf.pool import SSFPoolModel
from fedagg.training import LocalTrainConfig, federated_state, minibatches

__all__ = [
    "BatchPlan",
    "BatchedResult",
    "ClientJob",
    "PerSampleLoss",
    "StepFn",
    "batched_local_sgd",
    "can_batch",
    "check_batchable",
    "masked_mean",
    "run_batched",
    "training_mode",
    "vmap_clients",
]

_T = TypeVar("_T")

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits (N, C), y (N,)) -> (N,)``: one loss per sample (no reduction)."""


@dataclasses.dataclass
class ClientJob:
    """One client of a batched call: its data ``x`` ``(n, *input_shape)`` and labels ``y`` ``(n,)``
    (int64, on the model's device), its local-training config and its own minibatch generator."""

    x: torch.Tensor
    y: torch.Tensor
    cfg: LocalTrainConfig
    generator: torch.Generator


@dataclasses.dataclass
class BatchedResult:
    """Outcome of a batched call over ``k`` clients.

    ``states``: name → ``(k, *shape)``, each client's federated state after training (keys and order
    of :func:`fedagg.training.federated_state`); ``losses``: per client, the mean training loss over
    its steps (``nan`` without data or steps); ``metrics``: per client extra metrics (``{}`` for SGD).
    """

    states: dict[str, torch.Tensor]
    losses: list[float]
    metrics: list[dict[str, float]]

    def client(self, i: int) -> dict[str, np.ndarray]:
        """Client ``i``'s state as numpy copies (float32), in order."""
        return {k: v[i].detach().cpu().numpy().copy() for k, v in self.states.items()}

    def numpy(self) -> dict[str, np.ndarray]:
        """``states`` as ``(k, *shape)`` numpy arrays (on the CPU), converted once for all clients:
        client ``i``'s state is ``{name: a[i]}`` (views; copy before writing)."""
        return {k: v.detach().cpu().numpy() for k, v in self.states.items()}


StepFn = Callable[
    [dict[str, torch.Tensor], torch.Tensor, "torch.Tensor | None", torch.Tensor],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]
"""``step(params, rows, valid, count) -> (loss (m,), records)``: the per-client losses of one step.

``params``: trainable name → ``(m, *shape)`` leaves; ``rows`` ``(m, B)``: rows of the concatenated
data; ``valid`` ``(m, B)`` bool (``None``: every row is real); ``count`` ``(m,)``: real rows per client.
``records``: extra per-client ``(m,)`` values averaged over the steps like the loss."""


# ---------------------------------------------------------------------------------------- checks
@contextmanager
def training_mode(model: nn.Module) -> Iterator[None]:
    """``model.train()`` for the duration, then every module's previous ``training`` flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def can_batch(model: nn.Module) -> str | None:
    """``None`` if ``model`` can go through :func:`batched_local_sgd`, else the reason it cannot.

    Refused: no trainable parameter; a trainable parameter that is not float32; tensors on more
    than one device; in training mode, a BatchNorm (batch statistics), a dropout with ``p > 0``
    (random), or any module owning buffers (they might change in training, and are shared here);
    a FedIns pool with ``selection="batch"`` (mixes the samples of a batch, so padding would count).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return "the model has no trainable parameter"
    for name, p in trainable:
        if p.dtype != torch.float32:
            return f"parameter {name} is {p.dtype}; batched training is float32 only"
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        return f"the model spans several devices ({sorted(map(str, devices))})"
    if isinstance(model, SSFPoolModel) and model.selection != "instance":
        return f"FedIns selection {model.selection!r} averages slots over the batch"
    with training_mode(model):
        for name, module in model.named_modules():
            if not module.training:
                continue
            where = f"{name or 'model'} ({type(module).__name__})"
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return f"{where} uses batch statistics in training"
            if isinstance(module, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)) and float(
                    getattr(module, "p", getattr(module, "dropout", 0.0))) > 0:
                return f"{where} has dropout (random in training)"
            if next(module.buffers(recurse=False), None) is not None:
                return f"{where} has buffers in training mode (they are shared, not trained)"
    return None


def check_batchable(model: nn.Module, jobs: Sequence[ClientJob]) -> None:
    """Raise ``ValueError`` if :func:`can_batch` refuses ``model`` or a job's ``x``/``y`` do not match."""
    reason = can_batch(model)
    if reason is not None:
        raise ValueError(f"model cannot be trained batched: {reason}")
    for i, job in enumerate(jobs):
        if job.y.ndim != 1 or len(job.x) != len(job.y):
            raise ValueError(f"jobs[{i}]: x {tuple(job.x.shape)} and y {tuple(job.y.shape)} do not "
                             "match (n, ...) and (n,)")


# ------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class BatchPlan:
    """Which clients train, in which order, on which rows of the concatenated data."""

    order: list[int]  # job indices of the trained clients, by decreasing step count (stable)
    steps: list[int]  # their step counts
    width: list[int]  # m_t: clients still training at step t (a prefix of ``order``)
    rows: torch.Tensor  # (T, m, B) int64 rows of x/y; padding repeats the client's first row
    valid: torch.Tensor | None  # (T, m, B) bool, None when no client is padded
    count: torch.Tensor  # (m,) float32 samples per minibatch b_i
    x: torch.Tensor  # (Σ n_i, *input_shape) the trained clients' data, in ``order``
    y: torch.Tensor  # (Σ n_i,)


def _plan(jobs: Sequence[ClientJob], device: torch.device) -> BatchPlan | None:
    """Draw every trained client's minibatch indices from its generator (as ``local_sgd`` would)."""
    active = [i for i, job in enumerate(jobs) if len(job.y) > 0 and job.cfg.steps > 0]
    if not active:
        return None
    order = sorted(active, key=lambda i: -jobs[i].cfg.steps)
    steps = [jobs[i].cfg.steps for i in order]
    sizes = [min(len(jobs[i].y), jobs[i].cfg.batch_size) for i in order]
    counts = [len(jobs[i].y) for i in order]
    horizon, width_b = steps[0], max(sizes)
    # A client whose data fits in one minibatch takes all its rows at every step and draws nothing
    # (minibatches yields arange(n)): its block is built for all such clients at once. The others
    # draw their permutations from their own generators, client by client.
    offsets = np.cumsum([0] + counts[:-1], dtype=np.int64)
    col = np.arange(width_b, dtype=np.int64)
    n_col = np.asarray(sizes, dtype=np.int64)[:, None]  # (m, 1)
    live = np.arange(horizon)[:, None, None] < np.asarray(steps)[None, :, None]  # (T, m, 1)
    within = col[None, :] < n_col  # (m, B)
    rows = np.broadcast_to(offsets[None, :, None] + np.where(within & live, col, 0), (horizon, len(order), width_b)).copy()
    valid = np.broadcast_to(within[None] & live, rows.shape).copy()
    for slot, i in enumerate(order):
        job = jobs[i]
        if counts[slot] <= job.cfg.batch_size:
            continue
        drawn = torch.stack(list(minibatches(counts[slot], job.cfg.batch_size, job.cfg.steps,
                                             job.generator))).numpy()  # (steps_i, b_i)
        rows[: drawn.shape[0], slot, : drawn.shape[1]] = drawn + offsets[slot]
    width = [sum(s > t for s in steps) for t in range(horizon)]
    padded = any(b != width_b for b in sizes)
    return BatchPlan(
        order=order, steps=steps, width=width, rows=torch.from_numpy(rows).to(device),
        valid=torch.from_numpy(valid).to(device) if padded else None,
        count=torch.tensor(sizes, dtype=torch.float32, device=device),
        x=torch.cat([jobs[i].x.to(device) for i in order]),
        y=torch.cat([jobs[i].y.to(device) for i in order]),
    )


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None, count: torch.Tensor) -> torch.Tensor:
    """Per-client mean over the real samples: ``(m, B)`` → ``(m,)`` (padded entries ignored)."""
    if valid is not None:
        values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.sum(1) / count


# ------------------------------------------------------------------------------------ optimisers
class _Coef:
    """A per-client hyperparameter: a python float when all clients share it, else an ``(m,)`` tensor."""

    def __init__(self, values: Sequence[float], device: torch.device) -> None:
        self.scalar: float | None = float(values[0]) if len(set(values)) == 1 else None
        self.vec = None if self.scalar is not None else torch.tensor(
            [float(v) for v in values], dtype=torch.float32, device=device)
        self.nonzero = any(v != 0 for v in values)

    def at(self, m: int, ndim: int) -> float | torch.Tensor:
        """The value for the first ``m`` clients, broadcastable against ``(m, *shape)`` (``ndim`` dims)."""
        if self.scalar is not None:
            return self.scalar
        assert self.vec is not None
        return self.vec[:m].reshape((m,) + (1,) * (ndim - 1))


def _axpy_(y: torch.Tensor, a: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y += a·x`` in place (``a`` a float or a broadcastable tensor)."""
    return y.add_(x, alpha=a) if isinstance(a, float) else y.addcmul_(x, a)


OptimizerName = Literal["sgd", "adam"]


class _Stacked:
    """SGD (momentum, weight decay, FedProx) or Adam on stacked ``(m0, *shape)`` parameters, with
    per-client clipping; each matches the torch optimiser of the per-client path, client by client."""

    def __init__(self, kind: OptimizerName, cfgs: Sequence[LocalTrainConfig],
                 init: Mapping[str, torch.Tensor], *, prox: bool, device: torch.device) -> None:
        self.kind = kind
        self.lr = _Coef([c.lr for c in cfgs], device)
        self.wd = _Coef([c.weight_decay for c in cfgs], device)
        self.momentum = _Coef([c.momentum for c in cfgs], device)
        self.mu = _Coef([c.proximal_mu if prox else 0.0 for c in cfgs], device)
        clip = [c.max_grad_norm for c in cfgs]
        self.clip = None if all(c is None for c in clip) else torch.tensor(
            [math.inf if c is None else float(c) for c in clip], dtype=torch.float32, device=device)
        self.anchor = dict(init) if self.mu.nonzero else {}
        self.state: dict[str, list[torch.Tensor]] = {}

    def step(self, t: int, params: Mapping[str, torch.Tensor],
             grads: Mapping[str, torch.Tensor | None]) -> None:
        """Update the first ``m`` clients' ``params`` ``(m, *shape)`` in place from their ``grads``."""
        m = len(next(iter(params.values())))
        full: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor | None] = {}  # None: every client has this gradient
        for name, p in params.items():
            g = grads[name]
            if g is None:  # unused by the loss: torch leaves it alone unless FedProx pulls it
                if not self.mu.nonzero:
                    continue
                g = torch.zeros_like(p)
                live[name] = None if self.mu.vec is None else self.mu.vec[:m] != 0
            else:
                live[name] = None
            if self.mu.nonzero:
                _axpy_(g, self.mu.at(m, p.ndim), p - self.anchor[name])
            full[name] = g
        if self.clip is not None and full:
            norms = torch.stack([g.reshape(m, -1).norm(dim=1) for g in full.values()], 1)
            total = torch.linalg.vector_norm(norms, dim=1)
            coef = torch.clamp(self.clip[:m] / (total + 1e-6), max=1.0)
            for g in full.values():
                g.mul_(coef.reshape((m,) + (1,) * (g.ndim - 1)))
        for name, g in full.items():
            p = params[name]
            mask = live[name]
            if mask is None:
                self._update(name, t, p, g, m)
            else:  # clients whose gradient torch would not have: keep their row as it was
                before = p.clone()
                self._update(name, t, p, g, m)
                p.copy_(torch.where(mask.reshape((m,) + (1,) * (p.ndim - 1)), p, before))

    def _update(self, name: str, t: int, p: torch.Tensor, g: torch.Tensor, m: int) -> None:
        if self.wd.nonzero:
            _axpy_(g, self.wd.at(m, p.ndim), p)
        lr = self.lr.at(m, p.ndim)
        if self.kind == "adam":
            self._adam(name, t, p, g, m, lr)
            return
        if self.momentum.nonzero:
            if t == 0:
                self.state[name] = [g.clone()]
            else:
                buf = self.state[name][0][:m]
                buf.mul_(self.momentum.at(m, p.ndim)).add_(g)
                g = buf
        _axpy_(p, -lr if isinstance(lr, float) else lr.neg(), g)

    def _adam(self, name: str, t: int, p: torch.Tensor, g: torch.Tensor, m: int,
              lr: float | torch.Tensor) -> None:
        """``torch.optim.Adam`` defaults (β = (0.9, 0.999), ε = 1e-8, no AMSGrad), step ``t + 1``."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        if t == 0:
            self.state[name] = [torch.zeros_like(p), torch.zeros_like(p)]
        exp_avg, exp_avg_sq = (s[:m] for s in self.state[name])
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = t + 1
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(eps)
        if isinstance(lr, float):
            p.addcdiv_(exp_avg, denom, value=-(lr / bias1))
        else:
            p.addcmul_(exp_avg / denom, lr / -bias1)


# ---------------------------------------------------------------------------------------- driver
def run_batched(
    model: nn.Module, jobs: Sequence[ClientJob], trainable: Sequence[str],
    make_step: Callable[[BatchPlan], StepFn], *, optimizer: OptimizerName = "sgd", prox: bool = True,
    records: Sequence[str] = (),
) -> tuple[BatchedResult, list[dict[str, float]]]:
    """Train ``trainable`` of ``model`` (a copy) for every job; the engine under the public calls.

    ``make_step(plan)`` builds the step function (see :data:`StepFn`) for the planned batch.
    ``prox``: apply each config's ``proximal_mu``. Returns the result (``metrics`` empty dicts) and,
    per client, the step mean of each ``records`` entry (``nan`` for untrained clients).
    """
    params = dict(model.named_parameters())
    device = params[trainable[0]].device
    init = {n: params[n].detach().clone() for n in trainable}
    plan = _plan(jobs, device)
    k = len(jobs)
    nan = float("nan")
    losses = [nan] * k
    means = [dict.fromkeys(records, nan) for _ in range(k)]
    final: dict[str, torch.Tensor] = {}
    if plan is not None:
        m0 = len(plan.order)
        stacked = {n: v.unsqueeze(0).repeat((m0,) + (1,) * v.ndim) for n, v in init.items()}
        opt = _Stacked(optimizer, [jobs[i].cfg for i in plan.order], init, prox=prox, device=device)
        log = torch.full((1 + len(records), len(plan.width), m0), nan, device=device)
        step = make_step(plan)
        # scaled_dot_product_attention on its composite (math) kernel: the fused kernels have no
        # vmap batching rule, so vmap would loop over the clients one by one (the flag is global
        # to the process while the call runs)
        with training_mode(model), sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            for t, m in enumerate(plan.width):
                leaves = {n: v[:m].detach().requires_grad_() for n, v in stacked.items()}
                valid = None if plan.valid is None else plan.valid[t, :m]
                loss, rec = step(leaves, plan.rows[t, :m], valid, plan.count[:m])
                grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
                with torch.no_grad():
                    opt.step(t, {n: v[:m] for n, v in stacked.items()}, dict(zip(leaves, grads, strict=True)))
                    log[0, t, :m] = loss.detach()
                    for r, name in enumerate(records, start=1):
                        log[r, t, :m] = rec[name].detach()
        values = log.cpu().tolist()
        for slot, (i, s) in enumerate(zip(plan.order, plan.steps, strict=True)):
            losses[i] = _step_mean([values[0][t][slot] for t in range(s)])
            for r, name in enumerate(records, start=1):
                means[i][name] = _step_mean([values[r][t][slot] for t in range(s)])
        final = stacked
    return _result(model, jobs, final, [] if plan is None else plan.order, losses), means


def _step_mean(values: Sequence[float]) -> float:
    """Running sum in step order, then ``/ steps`` (as ``local_sgd`` accumulates ``float(loss)``)."""
    total = 0.0
    for v in values:
        total += v
    return total / max(len(values), 1)


def _result(model: nn.Module, jobs: Sequence[ClientJob], final: Mapping[str, torch.Tensor],
            order: Sequence[int], losses: list[float]) -> BatchedResult:
    """Every client's federated state: the initial tensors, with trained clients' rows replaced."""
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(p), name)
    k = len(jobs)
    everyone = sorted(order) == list(range(k))  # every client trained: no initial rows to keep
    in_order = everyone and list(order) == list(range(k))
    states: dict[str, torch.Tensor] = {}
    handed: set[int] = set()
    for key, value in federated_state(model).items():
        trained = final.get(canonical.get(key, key))
        if trained is not None and in_order and id(trained) not in handed:
            out = trained  # already every client's row, in job order (private to this call)
            handed.add(id(trained))
        elif trained is not None and everyone:
            out = torch.empty_like(trained)
            out.index_copy_(0, torch.tensor(order, dtype=torch.int64, device=out.device), trained)
        else:
            out = value.detach().unsqueeze(0).repeat((k,) + (1,) * value.ndim)
            if trained is not None:
                out.index_copy_(0, torch.tensor(order, dtype=torch.int64, device=out.device), trained)
        states[key] = out
    return BatchedResult(states=states, losses=losses, metrics=[{} for _ in range(k)])


# ------------------------------------------------------------------------------------ public API
def vmap_clients(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``torch.func.vmap(fn)`` over the leading (client) dimension of every argument and output."""
    return torch.func.vmap(fn)


def _generic_forward(model: nn.Module) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Logits ``(k, B, C)``: ``functional_call(model, params_i, x_i)`` for every client ``i``."""

    def one(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(params), (x,))

    return vmap_clients(one)


def batched_local_sgd(model: nn.Module, jobs: Sequence[ClientJob], *,
                      loss_fn: PerSampleLoss | None = None) -> BatchedResult:
    """Train ``len(jobs)`` clients from ``model``'s current weights; ``model`` is not modified.

    Client ``i``'s result equals :func:`fedagg.training.local_sgd` ``(copy_of_model, jobs[i].x,
    jobs[i].y, jobs[i].cfg, jobs[i].generator)`` up to float32 rounding, with the same minibatches
    (each generator is advanced exactly as ``local_sgd`` would advance it). ``loss_fn`` gives one loss
    per sample (default cross-entropy); the client's loss is their mean over its minibatch. Raises
    ``ValueError`` when :func:`can_batch` refuses the model.
    """
    check_batchable(model, jobs)
    per_sample = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    forward = stacked_forward(model, trainable) or _generic_forward(model)

    def make_step(plan: BatchPlan) -> StepFn:
        def step(params: dict[str, torch.Tensor], rows: torch.Tensor, valid: torch.Tensor | None,
                 count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            m, b = rows.shape
            logits = forward(params, plan.x[rows])
            losses = per_sample(logits.reshape(m * b, -1), plan.y[rows].reshape(-1))
            if losses.shape != (m * b,):
                raise ValueError(f"loss_fn must return one loss per sample, got {tuple(losses.shape)}")
            return masked_mean(losses.reshape(m, b), valid, count), {}

        return step

    result, _ = run_batched(model, jobs, trainable, make_step)
    return result
