"""The optimizer of SPEC §5: Muon for the block matrices, AdamW for everything else, in one object.

Why two rules: a weight matrix is a linear map, and Muon updates it by the orthogonalized
momentum (every singular direction moves the same amount), which trains the block matrices
faster than Adam at the same cost. Embedding rows, the lm_head and the per-layer scalars are
not maps in that sense (a row is read only when its token appears), so they keep AdamW --
without weight decay (SPEC §5), i.e. bias-corrected Adam.

Everything lives in ONE `torch.optim.Optimizer` (`MuonAdamW`) whose param groups carry a
`kind` ("muon" or "adamw"), so `state_dict`, `zero_grad` and a schedule that sets
`group["lr"] = group["initial_lr"] * mult` work the standard way on every group.

Muon step, per group of same-shape matrices (stacked, so the orthogonalization is one batched
matmul per shape instead of one per matrix), as nanochat's optim.py does it (each step that
came later than SPEC §5 has a group key, and a flag in `recipe_flags`, that turns it off):
  1. Nesterov momentum: buf <- lerp(buf, g, 1 - mu); u = lerp(g, buf, mu).
  2. MuonEq (`equilibrate`, arXiv 2603.28254): every row of u is rescaled to the mean row
     norm, so the spectrum entering the orthogonalization is better conditioned.
  3. Polar Express (`polar_express`): 5 iterations, in bf16 or fp32 (`ortho_dtype`: nanochat
     uses the run's compute dtype), that map u to the nearest semi-orthogonal matrix (all
     singular values ~1), after dividing by its Frobenius norm x `polar_safety` (1.01).
  4. Muon+ (`renormalize`, arXiv 2602.21545): the result's Frobenius norm is set to
     sqrt(min(rows, cols)), that of an exactly semi-orthogonal matrix, correcting for the
     iteration's under-convergence.
  5. NorMuon: a running mean (`beta2`, 0.9) of the squared update along the smaller dimension
     gives one second moment per row (tall/square) or column (wide); the update is divided by
     its square root, then rescaled to keep its Frobenius norm.
  6. Step lr * max(1, rows/cols)^0.5 (a tall matrix's orthogonal update has smaller entries)
     with "cautious" decoupled weight decay: p -= lr * (u + wd * p * [u * p >= 0]), i.e. the
     decay only acts where it does not push against the update.

Distributed (ZeRO-2): with torch.distributed initialized and world_size > 1, `step()` itself
averages the gradients (so do NOT wrap the model in DDP), each rank updates only its shard and
keeps only that shard's state, then parameters are all-gathered. Shards:
  - Muon: the K matrices of a shape are split into contiguous blocks of ceil(K/world) whole
    matrices (the orthogonalization needs whole matrices); the gradient stack is zero-padded
    to ceil(K/world) * world, so a rank may own fewer matrices, or none.
  - AdamW: each parameter is flattened and split into ceil(numel/world) elements per rank,
    zero-padded at the end (Adam is elementwise, so any split gives the same result).
Gradient averaging uses reduce-scatter where the backend has it (NCCL; recent gloo), through
`_collectives`: torch >= 2.13's `reduce_scatter_single`/`all_gather_single` where they exist,
else the `reduce_scatter_tensor`/`all_gather_into_tensor` of every torch >= 2.0 (same arguments,
same results; 2.13 deprecates the old names, older CUDA builds lack the new ones). Where a
one-off probe finds it missing (older gloo), every rank all-reduces the whole padded buffer
and keeps its slice instead: same numbers, world_size times the traffic, which only a CPU run
ever pays. Optimizer state is per rank: save it as `optim_{step}_rank{r}.pt` and resume with
the same world size (`load_state_dict` checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from engine.models.base import GENERIC_GROUPS
from engine.models.gpt import GPT
from training.flags import Flag

# (a, b, c) per iteration, X <- a X + (b A + c A^2) X with A = X X^T: the Polar Express
# coefficients (arXiv 2505.16932) for 5 steps, each the minimax-optimal odd quintic for the
# singular-value range left by the previous step.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The coefficients assume singular values <= 1; bf16 rounding of the Frobenius normalization
# can overshoot that slightly, and 2% headroom keeps the first (aggressive) step stable.
# nanochat's current value; SPEC §5 (and this code before issue 19) had 1.02.
POLAR_EXPRESS_SAFETY = 1.01
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
# NorMuon's second-moment decay: nanochat's current 0.9 (SPEC §5: 0.95).
NORMUON_BETA2 = 0.9
ORTHO_DTYPES = ("auto", "bf16", "fp32")
# Adam LRs were tuned at width 768; wider models take proportionally smaller steps.
ADAM_REFERENCE_WIDTH = 768
# The resid lambdas scale the whole residual stream at every layer, so a small move has a
# large effect: they get 1% of the scalar LR. The x0 lambdas get the full LR with a higher
# beta1 (smoother steps), as in nanochat.
RESID_LAMBDA_LR_FRACTION = 0.01
X0_LAMBDA_BETAS = (0.96, 0.95)
# The smear gate and its lambdas (and the backout lambda), where a GPT has them: nanochat
# gives them a fixed LR, scaled by nothing.
SMEAR_LR = 0.2
# How the AdamW groups of a GPT are set (`adam_groups` flag), per group: (LR source, LR
# multiplier, scaled by width, betas, weight decay). "nanochat": its current setup_optimizer
# (per-group betas and small decoupled decays, value embeddings at half the embedding LR);
# "uniform": SPEC §5 (betas (0.8, 0.95) everywhere but x0, no decay).
ADAM_GROUPS = ("nanochat", "uniform")
ADAM_GROUP_RULES: dict[str, dict[str, tuple[str, float, bool, tuple[float, float], float]]] = {
    "nanochat": {
        "lm_head": ("unembedding_lr", 1.0, True, (0.8, 0.96), 0.01),
        "wte": ("embedding_lr", 1.0, True, (0.8, 0.995), 0.001),
        "value_embeds": ("embedding_lr", 0.5, True, (0.8, 0.995), 0.01),
        "resid_lambdas": ("scalar_lr", RESID_LAMBDA_LR_FRACTION, False, (0.8, 0.95), 0.05),
        "x0_lambdas": ("scalar_lr", 1.0, False, X0_LAMBDA_BETAS, 0.0),
        "smear": ("fixed", SMEAR_LR, False, (0.8, 0.95), 0.0),
    },
    "uniform": {
        "lm_head": ("unembedding_lr", 1.0, True, ADAMW_BETAS, 0.0),
        "wte": ("embedding_lr", 1.0, True, ADAMW_BETAS, 0.0),
        "value_embeds": ("embedding_lr", 1.0, True, ADAMW_BETAS, 0.0),
        "resid_lambdas": ("scalar_lr", RESID_LAMBDA_LR_FRACTION, False, ADAMW_BETAS, 0.0),
        "x0_lambdas": ("scalar_lr", 1.0, False, X0_LAMBDA_BETAS, 0.0),
        "smear": ("fixed", SMEAR_LR, False, ADAMW_BETAS, 0.0),
    },
}
# GPT.param_groups() keys the builder knows; any other key is refused (a new parameter kind
# must get a rule here, never silently no optimizer).
GPT_GROUP_KEYS = ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "smear")
# The other families' 1-D parameters (norm gains, biases, gates) take this fraction of the
# scalar LR (see `build_optimizer`).
VECTOR_LR_FRACTION = 0.02
# The GPT-2 recipe's AdamW (SPEC §13).
GPT2_BETAS = (0.9, 0.95)
GPT2_EPS = 1e-8
OPTIMIZERS = ("muon", "adamw")
# Muon's momentum when no schedule sets it; base training ramps it up to this (SPEC §7).
MUON_MOMENTUM = 0.95

Kind = Literal["muon", "adamw"]
GradReduction = Literal["auto", "reduce_scatter", "all_reduce"]
_MUON_DEFAULTS = {
    "momentum": MUON_MOMENTUM,
    "beta2": NORMUON_BETA2,
    "weight_decay": 0.0,
    "equilibrate": True,
    "renormalize": True,
    "polar_safety": POLAR_EXPRESS_SAFETY,
    "ortho_dtype": "bf16",
}
# What a Muon group saved before these keys existed did (SPEC §5): a resumed run keeps its math.
_MUON_LEGACY = {
    "equilibrate": False,
    "renormalize": False,
    "polar_safety": 1.02,
    "ortho_dtype": "bf16",
}
_ORTHO_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ADAMW_DEFAULTS = {"betas": ADAMW_BETAS, "eps": ADAMW_EPS, "weight_decay": 0.0}


def polar_express(
    g: torch.Tensor,
    *,
    safety: float = POLAR_EXPRESS_SAFETY,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The semi-orthogonal factor of each matrix in `g` (..., rows, cols), approximately.

    Normalizes by the Frobenius norm x `safety` (in fp32), then runs the 5 Polar Express
    iterations in `dtype` (bf16: fast on a GPU; fp32: what nanochat runs on a CPU). A tall
    matrix is transposed first so the Gram matrix A = X X^T is the small side. Returns g's
    dtype and shape.
    """
    if g.dim() < 2:
        raise ValueError(
            f"polar_express needs matrices (..., rows, cols), got shape {tuple(g.shape)}"
        )
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    shape = x.shape
    x = x.reshape(-1, *shape[-2:]).float()
    norm = torch.linalg.matrix_norm(x, keepdim=True)
    x = (x / (norm * safety + 1e-6)).to(dtype)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(shape)
    return (x.mT if tall else x).to(g.dtype)


def equilibrate_rows(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: each row of each matrix in `u` (..., rows, cols) rescaled to the matrix's mean
    row norm (its Frobenius norm / sqrt(rows)), so no row dominates the orthogonalization."""
    x = u.float()
    target = torch.linalg.matrix_norm(x, keepdim=True) / math.sqrt(u.size(-2))
    row_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)
    return (x * (target / row_norm)).to(u.dtype)


def renormalize(u: torch.Tensor) -> torch.Tensor:
    """Muon+: each matrix's Frobenius norm set to sqrt(min(rows, cols)), the norm of an exactly
    semi-orthogonal matrix (5 Polar Express steps leave small singular values below 1)."""
    target = math.sqrt(min(u.size(-2), u.size(-1)))
    norm = torch.linalg.matrix_norm(u.float(), keepdim=True).clamp_min(1e-6)
    return u * (target / norm).to(u.dtype)


def _normuon(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """Divide each row (or column) of the stacked update by its running RMS, keeping the norm."""
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    second_moment.lerp_(update.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    scaled = update * second_moment.clamp_min(1e-10).rsqrt()
    old_norm = torch.linalg.vector_norm(update, dim=(-2, -1), keepdim=True)
    new_norm = torch.linalg.vector_norm(scaled, dim=(-2, -1), keepdim=True)
    return scaled * (old_norm / new_norm.clamp_min(1e-10))


def _muon_update(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: dict[str, torch.Tensor],
    group: dict[str, Any],
) -> None:
    """One Muon step on a stack of same-shape matrices `params` (n, rows, cols), in place.

    `grads` is a scratch copy (the stacked or reduced gradients) and is overwritten.
    """
    momentum = group["momentum"]
    buf = state["momentum_buffer"]
    buf.lerp_(grads, 1 - momentum)
    update = grads.lerp_(buf, momentum)
    if group["equilibrate"]:
        update = equilibrate_rows(update)
    update = polar_express(
        update, safety=group["polar_safety"], dtype=_ORTHO_TORCH_DTYPES[group["ortho_dtype"]]
    )
    if group["renormalize"]:
        update = renormalize(update)
    update = _normuon(update, state["second_momentum_buffer"], group["beta2"])
    rows, cols = params.shape[-2:]
    lr = group["lr"] * max(1.0, rows / cols) ** 0.5
    decay = params * ((update * params) >= 0) * group["weight_decay"]
    params.sub_(lr * (update + decay))


def _adamw_update(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
) -> None:
    """One bias-corrected Adam step on a flat slice, in place. A group's weight decay is
    decoupled (p <- p (1 - lr wd) before the Adam step, as torch.optim.AdamW and nanochat):
    the GPT recipe's per-group decays (`ADAM_GROUP_RULES`) and the GPT-2 recipe's matrices."""
    beta1, beta2 = group["betas"]
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
    state["step"] += 1
    step = state["step"]
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def _check_muon_group(group: dict[str, Any]) -> None:
    """Refuse Muon options no step could use, naming the key."""
    if not 0.0 <= group["beta2"] < 1.0:
        raise ValueError(f"muon beta2 must be in [0, 1), got {group['beta2']}")
    if not (math.isfinite(group["polar_safety"]) and group["polar_safety"] >= 1.0):
        raise ValueError(f"muon polar_safety must be a number >= 1, got {group['polar_safety']}")
    if group["ortho_dtype"] not in _ORTHO_TORCH_DTYPES:
        raise ValueError(
            f"muon ortho_dtype must be one of {sorted(_ORTHO_TORCH_DTYPES)}, "
            f"got {group['ortho_dtype']!r}"
        )


def _shard(total: int, world: int, rank: int) -> tuple[int, int, int]:
    """(per_rank, lo, hi): rank owns items [lo, hi) of `total` split in blocks of per_rank."""
    per_rank = math.ceil(total / world)
    lo = min(rank * per_rank, total)
    return per_rank, lo, min(lo + per_rank, total)


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW over kind-tagged param groups, optionally ZeRO-2 sharded across ranks.

    Each group is a dict with `params`, `kind` and `lr`; optional keys default as follows.
    muon: momentum 0.95, beta2 0.9, weight_decay 0, equilibrate True, renormalize True,
    polar_safety 1.01, ortho_dtype "bf16" (all params 2-D, one shape per group).
    adamw: betas (0.8, 0.95), eps 1e-10. Every group gets `initial_lr` (= lr unless given).

    distributed: None = shard when torch.distributed is initialized with world_size > 1;
    True = require that; False = plain single-process optimizer. grad_reduction: how gradients
    are averaged when sharded ("auto" probes the backend for reduce-scatter once; see the
    module docstring). max_grad_norm: clip the averaged gradients' global norm (None: off).
    An adamw group's weight_decay (default 0) is decoupled AdamW decay.
    """

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]],
        *,
        distributed: bool | None = None,
        grad_reduction: GradReduction = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm}")
        # Gradient clipping (the GPT-2 recipe): the global norm of the averaged gradients is
        # scaled to at most this before the update; `last_grad_norm` keeps the norm (a tensor).
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None
        if grad_reduction not in ("auto", "reduce_scatter", "all_reduce"):
            raise ValueError(
                "grad_reduction must be 'auto', 'reduce_scatter' or 'all_reduce', "
                f"got {grad_reduction!r}"
            )
        initialized = dist.is_available() and dist.is_initialized()
        if distributed and not initialized:
            raise ValueError("distributed=True needs torch.distributed to be initialized first")
        self.world_size = dist.get_world_size() if initialized and distributed is not False else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        super().__init__(list(param_groups), defaults={})
        # Whether sharded steps use reduce-scatter/all-gather (else the all-reduce fallback).
        self.reduce_scatter = self.world_size > 1 and (
            grad_reduction == "reduce_scatter"
            or (grad_reduction == "auto" and _backend_has_reduce_scatter(self.param_groups))
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"param group 'kind' must be 'muon' or 'adamw', got {kind!r}")
        if "lr" not in group:
            raise ValueError(f"{kind} param group needs an 'lr'")
        for key, value in (_MUON_DEFAULTS if kind == "muon" else _ADAMW_DEFAULTS).items():
            group.setdefault(key, value)
        group.setdefault("initial_lr", group["lr"])
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not params:
            raise ValueError(f"{kind} param group {group.get('name', '')!r} has no parameters")
        if kind == "muon":
            shapes = {tuple(p.shape) for p in params}
            if len(shapes) != 1 or params[0].dim() < 2:
                raise ValueError(
                    "a muon param group must hold matrices (or stacks of them, e.g. a MoE "
                    f"layer's experts) of one shape, got {sorted(shapes)}"
                )
        if kind == "muon":
            _check_muon_group(group)
        group["params"] = params
        super().add_param_group(group)

    def set_lr_multiplier(self, multiplier: float) -> None:
        """Set every group's lr to initial_lr * multiplier (the LR schedule's hook)."""
        if not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(f"lr multiplier must be a finite number >= 0, got {multiplier}")
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        for group in self._groups("muon"):
            group["momentum"] = momentum

    def set_muon_weight_decay(self, weight_decay: float) -> None:
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        for group in self._groups("muon"):
            group["weight_decay"] = weight_decay

    def _groups(self, kind: Kind) -> list[dict[str, Any]]:
        return [group for group in self.param_groups if group["kind"] == kind]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sharding"] = {"world_size": self.world_size, "rank": self.rank}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("sharding", {"world_size": 1, "rank": 0})
        here = {"world_size": self.world_size, "rank": self.rank}
        if saved != here:
            raise ValueError(
                f"optimizer state was saved by rank {saved['rank']} of {saved['world_size']} "
                f"but is being loaded by rank {self.rank} of {self.world_size}: resume with the "
                "same number of processes, each loading its own optim_*_rank<r>.pt"
            )
        super().load_state_dict(state_dict)
        # torch restores each group's saved keys; a group saved before a Muon key existed
        # keeps the math it was trained with.
        for group in self._groups("muon"):
            for key, value in _MUON_LEGACY.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Average gradients (when sharded), update this rank's shard, gather parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    raise RuntimeError(
                        f"parameter {i} of the {group['kind']} group {group.get('name', '')!r} "
                        "has no gradient: every parameter must take part in the loss "
                        "(sharded ranks must all reduce the same tensors)"
                    )
        # Three passes so communication overlaps compute: start every gradient reduction,
        # then update each group as its reduction lands (starting its gather), then finish.
        units = [u for group in self.param_groups for u in self._units(group)]
        reductions = [self._start_reduction(unit) for unit in units]
        if self.max_grad_norm is not None:
            # Clipping needs the norm of the whole averaged gradient before any update, so
            # the reductions are all waited for first (no overlap with the updates).
            landed = [wait() for wait in reductions]
            self._clip(units, landed)
            reductions = [lambda grads=grads: grads for grads in landed]
        gathers = [self._update(unit, grads) for unit, grads in zip(units, reductions, strict=True)]
        for finish in gathers:
            finish()
        return loss

    def _clip(self, units: list[_Unit], grads: list[torch.Tensor]) -> None:
        """Scale the averaged gradients so their global L2 norm is at most max_grad_norm.

        Each rank holds its shard of every averaged gradient, so the squared norms of the
        owned parts summed over ranks give the global norm. The norm stays on the device
        (`last_grad_norm`): nothing here makes a GPU wait."""
        device = grads[0].device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for unit, grad in zip(units, grads, strict=True):
            squares += grad[: unit.owned].float().square().sum()
        if self.world_size > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        norm = squares.sqrt()
        scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
        self.last_grad_norm = norm

    def _units(self, group: dict[str, Any]) -> list[_Unit]:
        """The pieces updated as one: a Muon group's whole stack, or one AdamW parameter."""
        if group["kind"] == "muon":
            return [_Unit(group, group["params"], self.world_size, self.rank)]
        return [_Unit(group, [p], self.world_size, self.rank) for p in group["params"]]

    def _start_reduction(self, unit: _Unit) -> Callable[[], torch.Tensor]:
        """Start averaging the unit's gradients; the returned call waits for this rank's shard."""
        if self.world_size == 1:
            grads = unit.flat_grads()
            return lambda: grads
        padded = unit.padded_grads()
        if self.reduce_scatter:
            out = padded.new_empty((unit.per_rank, *padded.shape[1:]))
            reduce_scatter, _ = _collectives()
            work = reduce_scatter(out, padded, op=dist.ReduceOp.AVG, async_op=True)

            def wait_reduce_scatter() -> torch.Tensor:
                work.wait()
                return out

            return wait_reduce_scatter
        work = dist.all_reduce(padded, op=dist.ReduceOp.SUM, async_op=True)

        def wait_all_reduce() -> torch.Tensor:
            work.wait()
            start = self.rank * unit.per_rank
            return padded[start : start + unit.per_rank].div_(self.world_size)

        return wait_all_reduce

    def _update(self, unit: _Unit, wait_grads: Callable[[], torch.Tensor]) -> Callable[[], None]:
        """Update this rank's shard of the unit; returns the call that finishes the gather."""
        grads = wait_grads()[: unit.owned]
        local = unit.local_params()
        state = self.state[unit.params[0]]
        if not state:
            state.update(unit.fresh_state(local))
        if unit.owned:
            if unit.kind == "muon":
                _muon_update(local[: unit.owned], grads, state, unit.group)
            else:
                _adamw_update(local[: unit.owned], grads, state, unit.group)
        if self.world_size == 1:
            return lambda: unit.write_back(local)
        gathered = local.new_empty((unit.per_rank * self.world_size, *local.shape[1:]))
        if self.reduce_scatter:
            _, all_gather = _collectives()
            work = all_gather(gathered, local, async_op=True)
        else:
            work = dist.all_gather(list(gathered.chunk(self.world_size)), local, async_op=True)

        def finish() -> None:
            work.wait()
            unit.write_back(gathered)

        return finish


class _Unit:
    """What one rank sees of a Muon stack or an AdamW parameter: sizes, its shard, copies.

    Muon units index whole matrices (dim 0 of the stack); AdamW units index flat elements.
    """

    def __init__(
        self, group: dict[str, Any], params: list[torch.Tensor], world: int, rank: int
    ) -> None:
        self.group = group
        self.kind: Kind = group["kind"]
        self.params = params
        self.total = len(params) if self.kind == "muon" else params[0].numel()
        self.per_rank, self.lo, self.hi = _shard(self.total, world, rank)
        self.owned = self.hi - self.lo
        self.world = world

    def _item_shape(self) -> tuple[int, ...]:
        return tuple(self.params[0].shape) if self.kind == "muon" else ()

    def flat_grads(self) -> torch.Tensor:
        """All gradients, unpadded: the (K, rows, cols) stack or the flat parameter gradient."""
        if self.kind == "muon":
            return torch.stack([p.grad for p in self.params])
        return self.params[0].grad.reshape(-1)

    def padded_grads(self) -> torch.Tensor:
        """A fresh buffer of per_rank * world items holding the gradients, zeros after them."""
        first = self.params[0]
        padded = first.grad.new_zeros((self.per_rank * self.world, *self._item_shape()))
        if self.kind == "muon":
            for i, p in enumerate(self.params):
                padded[i].copy_(p.grad)
        else:
            padded[: self.total].copy_(first.grad.reshape(-1))
        return padded

    def local_params(self) -> torch.Tensor:
        """This rank's shard as a tensor to update in place.

        Single process: the stacked matrices, or a view of the flat parameter itself. Sharded:
        a per_rank-item buffer (owned items first, zeros after) that is the all-gather input.
        """
        if self.world == 1:
            if self.kind == "muon":
                return torch.stack(self.params)
            return self.params[0].view(-1)
        first = self.params[0]
        local = first.new_zeros((self.per_rank, *self._item_shape()))
        if self.kind == "muon":
            for i in range(self.owned):
                local[i].copy_(self.params[self.lo + i])
        else:
            local[: self.owned].copy_(first.view(-1)[self.lo : self.hi])
        return local

    def fresh_state(self, local: torch.Tensor) -> dict[str, Any]:
        owned = local[: self.owned]
        if self.kind == "adamw":
            return {
                "step": 0,
                "exp_avg": torch.zeros_like(owned),
                "exp_avg_sq": torch.zeros_like(owned),
            }
        *lead, rows, cols = owned.shape
        stat_shape = (*lead, rows, 1) if rows >= cols else (*lead, 1, cols)
        return {
            "momentum_buffer": torch.zeros_like(owned),
            "second_momentum_buffer": owned.new_zeros(stat_shape),
        }

    def write_back(self, values: torch.Tensor) -> None:
        """Copy the first `total` items of `values` (stack or flat) into the parameters."""
        if self.kind == "muon":
            for i, p in enumerate(self.params):
                p.copy_(values[i])
        elif values.data_ptr() != self.params[0].data_ptr():
            self.params[0].view(-1).copy_(values[: self.total])


def _collectives() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(reduce_scatter, all_gather) over whole tensors, in this torch's stable spelling.

    Both take (output, input, ..., async_op=...) with the input (reduce-scatter) or output
    (all-gather) being world_size outputs concatenated along dim 0. Looked up per call, not at
    import, so a test can hide the newer names and run the older ones on gloo.
    """
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return reduce_scatter, all_gather


def _backend_has_reduce_scatter(param_groups: list[dict[str, Any]]) -> bool:
    """Whether the default process group can reduce-scatter with AVG (older gloo cannot).

    Every rank calls this at the same point with the same backend, so they all take the same
    branch, and an unsupported op is refused locally before any data moves.
    """
    device = param_groups[0]["params"][0].device
    world = dist.get_world_size()
    probe = torch.ones(world, device=device)
    out = torch.empty(1, device=device)
    reduce_scatter, all_gather = _collectives()
    try:
        reduce_scatter(out, probe, op=dist.ReduceOp.AVG)
        all_gather(probe, out)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def set_schedule(
    optimizer: MuonAdamW,
    *,
    lr_mult: float,
    momentum: float | None = None,
    weight_decay: float | None = None,
) -> None:
    """Apply one step's schedule values: LR multiplier for every group, Muon momentum and decay.

    None leaves that value as it is (SFT and RL schedule only the LR).
    """
    optimizer.set_lr_multiplier(lr_mult)
    if momentum is not None:
        optimizer.set_muon_momentum(momentum)
    if weight_decay is not None:
        optimizer.set_muon_weight_decay(weight_decay)


LR_NAMES = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
# Upper bounds of the optimizer flags: orders of magnitude above any tuned value (LRs <= 0.5,
# weight decay <= 0.3), so only typos are refused.
MAX_LR = 100.0
MAX_WEIGHT_DECAY = 10.0
MAX_LR_FRAC = 10.0  # init_lr_frac: a multiplier of the base LRs


def lr_flags(embedding_lr: float = 0.3, unembedding_lr: float = 0.008) -> list[Flag]:
    """The four learning-rate flags of the programs that train (`build_optimizer`'s LRs).

    The defaults are nanochat's base_train ones (its SFT inherits them from pretraining);
    unembedding_lr was 0.004 before issue 19, as it still is in nanochat's RL."""
    return [
        Flag(
            "embedding_lr",
            float,
            embedding_lr,
            "AdamW LR of the token and value embeddings",
            min=0,
            max=MAX_LR,
        ),
        Flag(
            "unembedding_lr", float, unembedding_lr, "AdamW LR of the lm_head", min=0, max=MAX_LR
        ),  # fmt: skip
        Flag("matrix_lr", float, 0.02, "Muon LR of the transformer matrices", min=0, max=MAX_LR),
        Flag("scalar_lr", float, 0.5, "AdamW LR of the per-layer scalars", min=0, max=MAX_LR),
    ]


@dataclass(frozen=True)
class MuonOptions:
    """The Muon step's options beyond LR, momentum and decay (see the module docstring);
    the defaults are nanochat's current step, each one a flag (`recipe_flags`)."""

    beta2: float = NORMUON_BETA2
    equilibrate: bool = True
    renormalize: bool = True
    polar_safety: float = POLAR_EXPRESS_SAFETY
    ortho_dtype: str = "bf16"

    def group_keys(self) -> dict[str, Any]:
        return asdict(self)


def muon_options_for(config: dict[str, Any], compute_dtype: torch.dtype | None) -> MuonOptions:
    """A program's `MuonOptions` from its flags; `muon_ortho_dtype` auto resolves to the run's
    compute dtype (bf16 under bf16 autocast, else fp32), as nanochat does. A config saved
    before a flag existed gets today's default."""
    choice = config.get("muon_ortho_dtype", "auto")
    if choice == "auto":
        choice = "bf16" if compute_dtype in (None, torch.bfloat16) else "fp32"
    defaults = MuonOptions()
    return MuonOptions(
        beta2=config.get("muon_beta2", defaults.beta2),
        equilibrate=config.get("muon_equilibrate", defaults.equilibrate),
        renormalize=config.get("muon_renormalize", defaults.renormalize),
        polar_safety=config.get("muon_polar_safety", defaults.polar_safety),
        ortho_dtype=choice,
    )


def build_optimizer(
    model: GPT,
    *,
    embedding_lr: float,
    unembedding_lr: float,
    matrix_lr: float,
    scalar_lr: float,
    weight_decay: float,
    lr_scale: float = 1.0,
    lr_frac: float = 1.0,
    muon: MuonOptions | None = None,
    adam_groups: str = "nanochat",
    distributed: bool | None = None,
    grad_reduction: GradReduction = "auto",
    max_grad_norm: float | None = None,
) -> MuonAdamW:
    """The SPEC §5 optimizer for `model`, as nanochat sets it up today: one Muon group per
    block-matrix shape, AdamW for the rest.

    GPT's AdamW groups follow `ADAM_GROUP_RULES[adam_groups]` (a GPT.param_groups() key the
    rules do not know is refused, so a new kind of parameter cannot go unoptimized); the other
    families (whose `param_groups` use the shared names of engine/models/base.py) get the same
    rule by kind: Muon for `matrices`, AdamW at embedding_lr / unembedding_lr for `embeddings`
    / `lm_head` (a tied head: the smaller of the two for the shared table), and scalar_lr x
    VECTOR_LR_FRACTION for `vectors` (norm gains, biases, gates: there are many of them, unlike
    GPT's two scalar vectors, and a full scalar LR on a norm gain diverges).

    lr_scale multiplies every LR but the smear group's fixed one (the sqrt(B / B_ref)
    batch-size scaling, `training.scaling.optimizer_hyperparameters`). lr_frac multiplies every
    LR, the fixed one included: a fine-tuning stage's fraction of the base LRs (SFT/RL's
    `init_lr_frac`), as nanochat's fine-tuning scales every group. The AdamW LRs of
    lm_head, wte and value embeddings are also scaled by (n_embd / 768)^-0.5; the scalars are
    not (their effect does not grow with width). weight_decay is Muon's initial decay (each
    step shrinks agreeing weights by lr * wd); change it, the momentum and the LR multiplier
    per step with `set_schedule`. muon: the Muon step's options (default nanochat's current
    step). distributed and grad_reduction: see `MuonAdamW`.
    """
    named = {
        "embedding_lr": embedding_lr,
        "unembedding_lr": unembedding_lr,
        "matrix_lr": matrix_lr,
        "scalar_lr": scalar_lr,
        "weight_decay": weight_decay,
    }
    _check_lrs(named, lr_scale)
    if not math.isfinite(lr_frac) or lr_frac <= 0:
        raise ValueError(f"lr_frac must be a finite number > 0, got {lr_frac}")
    named = {k: v if k == "weight_decay" else v * lr_frac for k, v in named.items()}
    if adam_groups not in ADAM_GROUP_RULES:
        raise ValueError(f"adam_groups must be one of {ADAM_GROUPS}, got {adam_groups!r}")
    muon_keys = (muon or MuonOptions()).group_keys()
    by_kind = model.param_groups()
    if set(by_kind) == set(GENERIC_GROUPS):
        return _build_generic_muon(
            model, by_kind, **named, lr_scale=lr_scale, muon_keys=muon_keys,
            distributed=distributed, grad_reduction=grad_reduction, max_grad_norm=max_grad_norm,
        )  # fmt: skip
    unknown = sorted(set(by_kind) - set(GPT_GROUP_KEYS))
    if unknown:
        raise ValueError(
            f"the model's parameter group(s) {unknown} have no optimizer rule (known: "
            f"{', '.join(GPT_GROUP_KEYS)}): add one to training/optim.py's ADAM_GROUP_RULES"
        )
    if {id(p) for p in by_kind["scalars"]} != {id(model.resid_lambdas), id(model.x0_lambdas)}:
        raise ValueError("expected the model's scalars to be exactly resid_lambdas and x0_lambdas")
    width_scale = (model.config.n_embd / ADAM_REFERENCE_WIDTH) ** -0.5
    params = {
        "lm_head": by_kind["lm_head"],
        "wte": by_kind["wte"],
        "value_embeds": by_kind["value_embeds"],
        "resid_lambdas": [model.resid_lambdas],
        "x0_lambdas": [model.x0_lambdas],
        "smear": by_kind.get("smear", []),
    }
    groups: list[dict[str, Any]] = []
    for name, (source, fraction, width_scaled, betas, decay) in ADAM_GROUP_RULES[
        adam_groups
    ].items():
        if not params[name]:
            continue
        lr = fraction * lr_frac if source == "fixed" else named[source] * fraction * lr_scale
        if width_scaled:
            lr *= width_scale
        groups.append({"name": name, "kind": "adamw", "params": params[name], "lr": lr,
                       "betas": betas, "eps": ADAMW_EPS, "weight_decay": decay})  # fmt: skip
    groups += _muon_groups(
        by_kind["transformer_matrices"], named["matrix_lr"] * lr_scale, weight_decay, muon_keys
    )
    return MuonAdamW(
        groups, distributed=distributed, grad_reduction=grad_reduction, max_grad_norm=max_grad_norm
    )


def _check_lrs(named: dict[str, float], lr_scale: float) -> None:
    for name, value in named.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not math.isfinite(lr_scale) or lr_scale <= 0:
        raise ValueError(f"lr_scale must be a finite number > 0, got {lr_scale}")


def _muon_groups(
    matrices: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    muon_keys: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One Muon group per matrix shape (a MoE layer's expert stack is one 3-D item)."""
    shapes: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
    for p in matrices:
        shapes.setdefault(tuple(p.shape), []).append(p)
    return [
        {"name": "muon " + "x".join(map(str, shape)), "kind": "muon", "params": params, "lr": lr,
         "weight_decay": weight_decay, **(muon_keys or {})}
        for shape, params in shapes.items()
    ]  # fmt: skip


def _build_generic_muon(
    model: torch.nn.Module,
    by_kind: dict[str, list[torch.nn.Parameter]],
    *,
    embedding_lr: float,
    unembedding_lr: float,
    matrix_lr: float,
    scalar_lr: float,
    weight_decay: float,
    lr_scale: float,
    muon_keys: dict[str, Any],
    distributed: bool | None,
    grad_reduction: GradReduction,
    max_grad_norm: float | None,
) -> MuonAdamW:
    adam_lr = lr_scale * (model.config.n_embd / ADAM_REFERENCE_WIDTH) ** -0.5
    # A tied head (GPT-2: the token embedding is also the output layer, lm_head is empty) takes
    # the smaller of the two LRs: the embedding LR moves every logit at once and diverges.
    tied = not by_kind["lm_head"]
    embeddings_lr = min(embedding_lr, unembedding_lr) if tied else embedding_lr
    groups = [
        {"name": "embeddings", "params": by_kind["embeddings"], "lr": embeddings_lr * adam_lr},
        {"name": "lm_head", "params": by_kind["lm_head"], "lr": unembedding_lr * adam_lr},
        {"name": "vectors", "params": by_kind["vectors"],
         "lr": scalar_lr * VECTOR_LR_FRACTION * lr_scale},
    ]  # fmt: skip
    groups = [dict(g, kind="adamw") for g in groups if g["params"]]
    groups += _muon_groups(by_kind["matrices"], matrix_lr * lr_scale, weight_decay, muon_keys)
    return MuonAdamW(
        groups, distributed=distributed, grad_reduction=grad_reduction, max_grad_norm=max_grad_norm
    )


def build_adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    lr_scale: float = 1.0,
    distributed: bool | None = None,
    grad_reduction: GradReduction = "auto",
    max_grad_norm: float | None = None,
) -> MuonAdamW:
    """The GPT-2 recipe (SPEC §13): AdamW on every parameter, betas (0.9, 0.95), decoupled
    weight decay on the parameters of two or more dimensions (weight matrices, embeddings)
    and none on biases and norm gains, gradient clipping by global norm. It runs in
    `MuonAdamW` with adamw groups only, so it shards (ZeRO-2), saves and resumes like Muon."""
    _check_lrs({"lr": lr, "weight_decay": weight_decay}, lr_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [
        dict(g, kind="adamw", lr=lr * lr_scale, betas=GPT2_BETAS, eps=GPT2_EPS)
        for g in groups
        if g["params"]
    ]
    return MuonAdamW(
        groups, distributed=distributed, grad_reduction=grad_reduction, max_grad_norm=max_grad_norm
    )


def recipe_flags() -> list[Flag]:
    """The flags that pick the optimizer recipe of a training run (base, mid, SFT, RL).

    The Muon and AdamW-group flags bring nanochat's current optimizer (issue 19); each
    default is the new behaviour, and the other value is what SPEC §5 described."""
    return [
        Flag("optimizer", str, "muon", "muon: Muon + AdamW (nanochat); adamw: AdamW on every "
             "parameter (the GPT-2 recipe)", choices=OPTIMIZERS),
        Flag("adamw_lr", float, 3e-4, "adamw recipe: peak LR of every parameter", min=0,
             max=MAX_LR),
        Flag("adamw_weight_decay", float, 0.1, "adamw recipe: decay of the 2-D weights (biases "
             "and norms get none)", min=0, max=MAX_WEIGHT_DECAY),
        Flag("grad_clip", float, 0.0, "clip the gradients' global norm to this (0: off)", min=0,
             max=1e6),
        Flag("muon_beta2", float, NORMUON_BETA2, "Muon: decay of NorMuon's per-neuron second "
             "moment (SPEC §5: 0.95)", min=0, max=0.9999),
        Flag("muon_equilibrate", bool, True, "Muon: MuonEq, rescale each row of the momentum "
             "to the mean row norm before orthogonalizing"),
        Flag("muon_renormalize", bool, True, "Muon: Muon+, set the orthogonalized update's "
             "norm to sqrt(min(rows, cols))"),
        Flag("muon_polar_safety", float, POLAR_EXPRESS_SAFETY, "Muon: divide by the Frobenius "
             "norm times this before Polar Express (SPEC §5: 1.02)", min=1, max=2),
        Flag("muon_ortho_dtype", str, "auto", "Muon: precision of Polar Express; auto = the "
             "run's compute dtype (bf16 or fp32), as nanochat (SPEC §5: always bf16)",
             choices=ORTHO_DTYPES),
        Flag("adam_groups", str, "nanochat", "GPT's AdamW groups: nanochat (per-group betas "
             "and small decays, value embeddings at half the embedding LR) or uniform (SPEC "
             "§5: betas (0.8, 0.95), no decay)", choices=ADAM_GROUPS),
    ]  # fmt: skip


def build_for(
    model: torch.nn.Module,
    config: dict[str, Any],
    *,
    weight_decay: float,
    lr_scale: float = 1.0,
    lr_frac: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> MuonAdamW:
    """The optimizer a training program's flags ask for (`recipe_flags` + `lr_flags`).

    weight_decay: Muon's (the program scales it); the adamw recipe uses adamw_weight_decay.
    lr_scale: the batch scaling; lr_frac: the stage's fraction of every LR (see
    `build_optimizer`).
    compute_dtype: the run's matmul dtype (what muon_ortho_dtype auto follows)."""
    clip = config.get("grad_clip", 0.0) or None
    if config.get("optimizer", "muon") == "adamw":
        return build_adamw(
            model, lr=config["adamw_lr"], weight_decay=config["adamw_weight_decay"],
            lr_scale=lr_scale * lr_frac, max_grad_norm=clip,
        )  # fmt: skip
    return build_optimizer(
        model, embedding_lr=config["embedding_lr"], unembedding_lr=config["unembedding_lr"],
        matrix_lr=config["matrix_lr"], scalar_lr=config["scalar_lr"], weight_decay=weight_decay,
        lr_scale=lr_scale, lr_frac=lr_frac, muon=muon_options_for(config, compute_dtype),
        adam_groups=config.get("adam_groups", "nanochat"), max_grad_norm=clip,
    )  # fmt: skip


def effective_groups(optimizer: MuonAdamW) -> list[dict[str, Any]]:
    """Each param group's hyperparameters as the run starts (for the start event and the
    log, so a user sees the LRs actually used after every scaling): name, kind, parameters,
    lr, weight decay, and betas/eps (AdamW) or momentum/beta2 and the Muon options."""
    rows = []
    for group in optimizer.param_groups:
        row = {
            "name": group.get("name", ""),
            "kind": group["kind"],
            "params": sum(p.numel() for p in group["params"]),
            "lr": group["initial_lr"],
            "weight_decay": group["weight_decay"],
        }
        if group["kind"] == "adamw":
            row.update(betas=list(group["betas"]), eps=group["eps"])
        else:
            row.update(momentum=group["momentum"],
                       **{key: group[key] for key in MuonOptions.__dataclass_fields__})  # fmt: skip
        rows.append(row)
    return rows
