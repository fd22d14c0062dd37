"""Muon as Kimi K2 uses it (K2_SPEC §2, step 1 of Algorithm 1; Moonlight arXiv 2502.16982).

    M_t = mu * M_{t-1} + G_t                       momentum (mu = 0.95)
    U_t = G_t + mu * M_t                           Nesterov: what Newton–Schulz sees
    O_t = NewtonSchulz(U_t)                        5 steps, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W_t = W_{t-1} * (1 - lr * wd) - lr * 0.2 * sqrt(max(n, m)) * O_t

Newton–Schulz: X_0 = U / ||U||_F, then X <- a X + (b A + c A^2) X with A = X X^T, on the
wide orientation (a tall matrix is transposed, so A is the small [short, short] Gram matrix).

The one non-obvious choice: every matrix is a batch element. A stacked expert weight
[E, out, in] is E independent matrices, and all matrices with the same (short, long) shape,
tall or wide, stacked or not, go through Newton–Schulz together as one [N, short, long]
batch: three bmm calls per iteration for the whole model's shape class instead of three
matmuls per matrix. Gate and up projections are separate parameters, hence separate matrices.

Distributed: a parameter that is a DTensor (FSDP2 shards dim 0) is gathered to its full
matrix for Newton–Schulz (orthogonalising a shard is wrong, K2_SPEC §2) and only the local
rows of the result are applied, as in Moonlight's distributed Muon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # floor of ||U||_F, as torch.optim.Muon
NS_BATCH_ELEMENTS = 1 << 27  # elements of one Newton–Schulz batch (512 MiB in float32)

try:  # DTensor only matters under FSDP2 / tensor parallelism
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"ns_dtype={name!r} is not a floating-point torch dtype "
                         "(use 'float32' or 'bfloat16')")
    return dtype


@torch.no_grad()
def zeropower_via_newtonschulz(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Approximate U V^T of each matrix of X [N, m, n] with m <= n (K2_SPEC §2, Newton–Schulz).

    X (a buffer the caller owns) is overwritten, and the result is returned in a buffer of
    the same shape and dtype. Every pass over the large [N, m, n] operand is a matmul:
    - the Frobenius normalisation is folded into the small matrices: ||U||_F^2 is the trace of
      the first Gram matrix U U^T, which is rescaled by 1/||U||^2, and the first product
      (B + a I) X_0 becomes ((B + a I) / ||U||) U;
    - a X + B X is computed as (B + a I) X (baddbmm(X, B, X) would first copy X into its
      output; the diagonal add touches N m elements).
    Two ping-pong buffers and the Gram buffers are reused across iterations, and across steps
    through `workspace` on CPU.
    """
    if X.ndim != 3 or X.shape[-2] > X.shape[-1]:
        raise ValueError(f"expected a batch of wide matrices [N, m, n] with m <= n, got {tuple(X.shape)}")
    a, b, c = coefficients
    N, m, _ = X.shape
    A = _buffer(workspace, "A", (N, m, m), X.dtype, X.device)
    torch.bmm(X, X.mT, out=A)                                                   # U U^T
    norm = A.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).float().sqrt_()  # ||U||_F   [N, 1]
    inv_norm = norm.clamp_min_(eps).reciprocal_().unsqueeze(-1)                 # [N, 1, 1]
    if steps == 0:
        return X.mul_(inv_norm.to(X.dtype))
    A.mul_((inv_norm * inv_norm).to(A.dtype))                                   # X_0 X_0^T
    Y = _buffer(workspace, "Y", X.shape, X.dtype, X.device)
    B = _buffer(workspace, "B", (N, m, m), X.dtype, X.device)
    for step in range(steps):
        if step > 0:
            torch.bmm(X, X.mT, out=A)                    # A = X X^T              [N, m, m]
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)   # B = b A + c A^2
        B.diagonal(dim1=-2, dim2=-1).add_(a)             # B + a I: a X folded into the product
        if step == 0:
            B.mul_(inv_norm.to(B.dtype))                 # X is still U = ||U|| X_0
        torch.bmm(B, X, out=Y)                           # Y = a X + (b A + c A^2) X   [N, m, n]
        X, Y = Y, X
    return X


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per MAC) of Newton–Schulz on one [..., rows, cols] tensor."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return math.prod(batch) * steps * (4 * m * m * n + 2 * m**3)


@torch.no_grad()
def muon_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_dtype: torch.dtype = torch.float32,
    eps: float = NS_EPS,
    max_batch_elements: int = NS_BATCH_ELEMENTS,
    workspace: dict | None = None,
) -> None:
    """One Muon step (K2_SPEC §2, Algorithm 1 step 1) on 2-D matrices and stacked [E, out, in]
    tensors, in place on params and momenta.

    M <- mu M + G;  O = NS(G + mu M) per matrix (NS(M) without Nesterov);
    W <- W (1 - lr wd) - lr 0.2 sqrt(max(n, m)) O.

    Matrices of one shape class are orthogonalised in batches of at most `max_batch_elements`
    elements (bounds the four Newton–Schulz buffers at K2 scale; one batch per class at CPU sizes).
    `workspace` (a dict the caller keeps) holds those buffers between steps on CPU, where a
    fresh allocation of a few hundred MB page-faults on every step (~150 ms per 200 MB on a
    2-core EPYC); CUDA's caching allocator already reuses memory, so nothing is kept there.
    """
    if not params:
        return
    p_local = [local_tensor(p) for p in params]
    g_local = [local_tensor(g) for g in grads]
    m_local = [local_tensor(m) for m in momenta]
    for g, m in zip(g_local, m_local):
        torch.add(g, m, alpha=momentum, out=m)  # M = mu M + G in one pass
    nesterov_mu = momentum if nesterov else None
    if weight_decay and lr:
        torch._foreach_mul_(p_local, 1.0 - lr * weight_decay)

    # Shape classes: (short, long, device, dtype) -> [(param index, matrices, tall)]
    classes: dict[tuple[int, int, torch.device, torch.dtype], list[tuple[int, int, bool]]] = {}
    for i, p in enumerate(params):
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon takes 2-D matrices or stacked [E, out, in] tensors, "
                             f"got shape {tuple(p.shape)}")
        rows, cols = p.shape[-2:]
        count = p.shape[0] if p.ndim == 3 else 1
        key = (min(rows, cols), max(rows, cols), p_local[i].device, p_local[i].dtype)
        classes.setdefault(key, []).append((i, count, rows > cols))

    for (short, long, device, param_dtype), members in classes.items():
        capacity = max(1, max_batch_elements // (short * long))  # matrices per Newton–Schulz batch
        for chunk in _chunks(members, capacity, [is_dtensor(p) for p in params]):
            N = sum(e1 - e0 for _, e0, e1, _ in chunk)
            X = _buffer(workspace, "X", (N, short, long), ns_dtype, device)  # [N, short, long]
            start = 0
            for i, e0, e1, tall in chunk:
                slot = _slot(X, start, e1 - e0, tall, params[i].ndim)  # in the parameter's orientation
                start += e1 - e0
                if is_dtensor(params[i]):
                    slot.copy_(_full_input(params[i], g_local[i], m_local[i], nesterov_mu))
                elif nesterov:
                    torch.add(_rows(g_local[i], e0, e1), _rows(m_local[i], e0, e1), alpha=momentum, out=slot)
                else:
                    slot.copy_(_rows(m_local[i], e0, e1))
            O = zeropower_via_newtonschulz(X, ns_steps, ns_coefficients, eps, workspace)
            if O.dtype != param_dtype:  # one cast per batch (a mixed-dtype add_ is ~7x slower on CPU)
                O = _buffer(workspace, "cast", O.shape, param_dtype, device).copy_(O)
            targets, updates = [], []
            start = 0
            for i, e0, e1, tall in chunk:
                update = _slot(O, start, e1 - e0, tall, params[i].ndim)
                start += e1 - e0
                if is_dtensor(params[i]):
                    targets.append(p_local[i])
                    updates.append(_local_rows(update, params[i]))
                else:
                    targets.append(_rows(p_local[i], e0, e1))
                    updates.append(update)
            torch._foreach_add_(targets, updates, alpha=-lr * 0.2 * math.sqrt(long))


def _buffer(workspace: dict | None, name: str, shape, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialised [N, ...] buffer; on CPU the leading rows of one kept in `workspace`,
    which grows to the largest N asked for (so memory stays bounded if N varies)."""
    if workspace is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, tuple(shape[1:]), dtype, device)
    kept = workspace.get(key)
    if kept is None or kept.shape[0] < shape[0]:
        kept = workspace[key] = torch.empty(shape, dtype=dtype, device=device)
    return kept[: shape[0]]


def _chunks(members: list[tuple[int, int, bool]], capacity: int, whole: list[bool]):
    """Split a shape class into Newton–Schulz batches of at most `capacity` matrices; yields
    lists of (param index, first matrix, end matrix, tall). A stacked tensor may span
    batches; a DTensor is gathered whole, so it is never split."""
    chunk, size = [], 0
    for i, count, tall in members:
        e0 = 0
        while e0 < count:
            if size >= capacity:
                yield chunk
                chunk, size = [], 0
            e1 = count if whole[i] else min(count, e0 + capacity - size)
            chunk.append((i, e0, e1, tall))
            size += e1 - e0
            e0 = e1
    if chunk:
        yield chunk


def _rows(t: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
    """Matrices e0:e1 of a stacked [E, out, in] tensor; a 2-D matrix is returned as is."""
    return t[e0:e1] if t.ndim == 3 else t


def _slot(batch: torch.Tensor, start: int, count: int, tall: bool, ndim: int) -> torch.Tensor:
    """The view of batch [N, short, long] that holds one parameter, in the parameter's shape."""
    view = batch[start : start + count]
    view = view.mT if tall else view
    return view if ndim == 3 else view[0]


def _full_input(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, nesterov_mu: float | None
                ) -> torch.Tensor:
    """G + mu M (or M) of a sharded parameter, gathered to the full matrix (NS needs whole matrices)."""
    local = buf if nesterov_mu is None else torch.add(grad, buf, alpha=nesterov_mu)
    return DTensor.from_local(local, param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride()).full_tensor()


def _local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full update, laid out as `param` is sharded."""
    full = full.contiguous()
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


class Muon(torch.optim.Optimizer):
    """Muon over 2-D matrices and stacked [E, out, in] expert tensors (see `muon_update`).

    State per parameter: `momentum_buffer` M (the sum form of K2_SPEC §2, not the EMA form of
    torch.optim.Muon: the two differ by the factor 1 - mu, which Newton–Schulz normalises away).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_dtype: str | torch.dtype = "float32",
        eps: float = NS_EPS,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 0:
            raise ValueError(f"Muon: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum} "
                             f"or ns_steps={ns_steps}")
        dtype_from_name(ns_dtype)
        ns_dtype = str(ns_dtype).removeprefix("torch.")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype, eps=eps)
        super().__init__(params, defaults)
        self._workspace: dict = {}  # Newton–Schulz buffers kept between steps on CPU (not state)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or stacked [E, out, in] tensors; got a "
                                     f"parameter of shape {tuple(p.shape)} (put it in an AdamW group)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momenta = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                momenta.append(state["momentum_buffer"])
            muon_update(
                params, grads, momenta, workspace=self._workspace, lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"], nesterov=group["nesterov"], ns_steps=group["ns_steps"],
                ns_coefficients=tuple(group["ns_coefficients"]), ns_dtype=dtype_from_name(group["ns_dtype"]),
                eps=group["eps"],
            )
        return loss
