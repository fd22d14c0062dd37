"""Muon as Kimi K2 uses it (K2_SPEC §2, step 1 of Algorithm 1; Moonlight arXiv 2502.16982).

    M_t = mu * M_{t-1} + G_t                       momentum (mu = 0.95)
    U_t = G_t + mu * M_t                           Nesterov: what Newton–Schulz sees
    O_t = NewtonSchulz(U_t)                        5 steps, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W_t = W_{t-1} * (1 - lr * wd) - lr * 0.2 * sqrt(max(n, m)) * O_t

Newton–Schulz: X_0 = U / ||U||_F, then X <- a X + (b A + c A^2) X with A = X X^T, written
for the wide orientation (for a tall matrix the products are the transposed ones, so A is
always the small [short, short] Gram matrix). For matrices at least about twice as wide as
tall (most of K2's: experts, q_b, kv_a, kv_b), the same iteration runs on the Gram matrix
itself (`_newton_schulz_gram`): 12% fewer FLOPs at 2:1, 30% at K2's 7168:2048 experts.

The one non-obvious choice: every matrix is a batch element. A stacked expert weight
[E, out, in] is E independent matrices, and all matrices of the same shape, stacked or not,
go through Newton–Schulz together as one [N, rows, cols] batch: three bmm calls per iteration
for the whole model's shape class instead of three matmuls per matrix. Gate and up
projections are separate parameters, hence separate matrices.

Distributed (K2_SPEC §2: Newton–Schulz must see whole matrices; orthogonalising a shard is wrong):
- a stacked [E, out, in] DTensor split along E (FSDP2 or expert parallelism) holds whole
  matrices locally: each rank orthogonalises its own experts, so that work is already divided;
- a 2-D DTensor in row blocks (FSDP2 Shard(0), HSDP) is owned by one rank, chosen largest
  matrix first onto the least-loaded rank; an all_to_all gathers each owner's matrices, the
  owner runs Newton–Schulz on its share only, and a second all_to_all scatters the rows of the
  update back to every rank that holds them (`_owner_update`);
- any other DTensor layout is gathered whole on every rank, and the local rows applied.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

try:  # DTensor only matters under FSDP2 / tensor parallelism
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None  # type: ignore[assignment,misc]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # floor of ||U||_F, as torch.optim.Muon
NS_BATCH_ELEMENTS = 1 << 27  # elements of one Newton–Schulz batch (512 MiB in float32)


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
    scale: float = 1.0,
) -> torch.Tensor:
    """Approximate U V^T of each matrix of X [N, rows, cols] (K2_SPEC §2, Newton–Schulz), times
    `scale` (folded into the last small [m, m] factor, so it costs no pass over X).

    The iteration is written for the wide orientation, m = min(rows, cols): A = X X^T is
    [m, m] and every step left-multiplies X by an [m, m] factor. A tall batch is worked on as
    it lies: its products are the transposed ones (A = X^T X, X F^T), which matmuls take as
    flags, so no pass over X transposes anything.

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
    if X.ndim != 3:
        raise ValueError(f"expected a batch of matrices [N, rows, cols], got {tuple(X.shape)}")
    a, b, c = coefficients
    N, rows, cols = X.shape
    m, n = min(rows, cols), max(rows, cols)
    gram, apply = (_tall_gram, _tall_apply) if rows > cols else (_wide_gram, _wide_apply)
    A = _buffer(workspace, "A", (N, m, m), X.dtype, X.device)
    gram(X, A)                                                                  # U U^T
    norm = A.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).float().sqrt_()  # ||U||_F   [N, 1]
    inv_norm = norm.clamp_min_(eps).reciprocal_().unsqueeze(-1)                 # [N, 1, 1]
    if steps == 0:
        return X.mul_((inv_norm * scale).to(X.dtype))
    A.mul_((inv_norm * inv_norm).to(A.dtype))                                   # X_0 X_0^T
    if _gram_is_cheaper(m, n, steps):
        return _newton_schulz_gram(X, A, inv_norm, steps, coefficients, workspace, scale, gram, apply)
    Y = _buffer(workspace, "Y", X.shape, X.dtype, X.device)
    B = _buffer(workspace, "B", (N, m, m), X.dtype, X.device)
    for step in range(steps):
        if step > 0:
            gram(X, A)                                   # A = X X^T              [N, m, m]
        _quadratic(A, b, c, out=B)                       # B = b A + c A^2
        B.diagonal(dim1=-2, dim2=-1).add_(a)             # B + a I: a X folded into the product
        if step == 0:
            B.mul_(inv_norm.to(B.dtype))                 # X is still U = ||U|| X_0
        if step == steps - 1 and scale != 1.0:
            B.mul_(scale)
        apply(B, X, Y)                                   # Y = a X + (b A + c A^2) X   [N, m, n]
        X, Y = Y, X
    return X


def _quadratic(A: torch.Tensor, b: float, c: float, out: torch.Tensor) -> None:
    """out = b A + c A^2. In bfloat16 on the CPU, baddbmm with beta != 0 first copies A into its
    output and accumulates onto it, slower than the product alone plus one add (2-7% of
    Newton-Schulz on the small preset); in float32 the fused form is as fast or faster."""
    if A.dtype == torch.bfloat16 and A.device.type == "cpu":
        torch.baddbmm(A, A, A, beta=0, alpha=c, out=out)
        out.add_(A, alpha=b)
    else:
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=out)


def _wide_gram(X: torch.Tensor, out: torch.Tensor) -> None:
    torch.bmm(X, X.mT, out=out)


def _tall_gram(X: torch.Tensor, out: torch.Tensor) -> None:
    torch.bmm(X.mT, X, out=out)


def _wide_apply(F: torch.Tensor, X: torch.Tensor, out: torch.Tensor) -> None:
    torch.bmm(F, X, out=out)   # F X


def _tall_apply(F: torch.Tensor, X: torch.Tensor, out: torch.Tensor) -> None:
    torch.bmm(X, F.mT, out=out)  # (F X^T)^T


def _newton_schulz_gram(X: torch.Tensor, A: torch.Tensor, inv_norm: torch.Tensor, steps: int,
                        coefficients: tuple[float, float, float], workspace: dict | None,
                        scale: float, gram, apply) -> torch.Tensor:
    """The same iteration on the small Gram matrix, where that costs fewer FLOPs (n > 1.5 m at 5 steps).

    Each step's factor M = a I + b A + c A^2 is a polynomial in A, so with X' = M X the next
    Gram matrix is A' = X' X'^T = M A M: the iteration can run on [m, m] matrices, keeping the
    product P of the factors, and touch the [m, n] operand only to apply P. In low precision the
    Gram matrix drifts from the X it stands for (bf16 on gradients with a decaying spectrum
    blows up by the fifth step), so X is materialised once midway and A recomputed from it.
    Products: 4 of [m, m] x [m, n] and 14 of [m, m] x [m, m] at 5 steps, against 10 and 5.
    X holds U (not yet normalised), A holds X_0 X_0^T; X is overwritten. `gram` and `apply`
    are the orientation's products (see zeropower_via_newtonschulz).
    """
    a, b, c = coefficients
    N, m = A.shape[:2]
    # Three [m, m] buffers rotate between the step's factor M, the product P and a temporary.
    M, P, T = (_buffer(workspace, name, (N, m, m), X.dtype, X.device) for name in ("B", "P", "T"))
    Y = _buffer(workspace, "Y", X.shape, X.dtype, X.device)
    pending = inv_norm  # factor X still owes: 1/||U|| until X is first materialised
    fresh = True        # P holds no factor yet
    for step in range(steps):
        _quadratic(A, b, c, out=M)                       # M = b A + c A^2
        M.diagonal(dim1=-2, dim2=-1).add_(a)             # + a I
        if fresh:
            P, M = M, P                                  # P = M (M's buffer, no copy)
            factor = P
        else:
            torch.bmm(M, P, out=T)                       # P = M P
            P, T = T, P
            factor = M
        fresh = False
        last = step == steps - 1
        if last or step == _gram_restart(steps):
            if pending is not None:
                P.mul_(pending.to(P.dtype))
            if last and scale != 1.0:
                P.mul_(scale)
            apply(P, X, Y)                               # X = P X                [N, m, n]
            X, Y = Y, X
            pending, fresh = None, True
            if not last:
                gram(X, A)                               # A recomputed from X
        else:
            torch.bmm(A, factor, out=T)
            torch.bmm(factor, T, out=A)                  # A = M A M
    return X


def _gram_restart(steps: int) -> int:
    """The step after which the Gram iteration materialises X and recomputes A."""
    return steps // 2


def _gram_is_cheaper(m: int, n: int, steps: int) -> bool:
    return _gram_flops(m, n, steps) < steps * (4 * m * m * n + 2 * m**3)


def _gram_flops(m: int, n: int, steps: int) -> int:
    """FLOPs of `_newton_schulz_gram` on one [m, n] matrix (the same loop, counted)."""
    flops, fresh = 2 * m * m * n, True  # the first Gram matrix
    for step in range(steps):
        flops += 2 * m**3 + (0 if fresh else 2 * m**3)  # A^2; P = M P
        fresh = False
        if step == steps - 1:
            flops += 2 * m * m * n
        elif step == _gram_restart(steps):
            flops += 4 * m * m * n
            fresh = True
        else:
            flops += 4 * m**3
    return flops


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per MAC) of Newton–Schulz on one [..., rows, cols] tensor, by the
    form `zeropower_via_newtonschulz` takes for its shape."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    if steps and _gram_is_cheaper(m, n, steps):
        return math.prod(batch) * _gram_flops(m, n, steps)
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

    The last line is one pass over W: Newton–Schulz returns O already scaled (its last step
    multiplies a small [m, m] matrix), and W (1 - w) - s O = lerp(W, -s O / w, w) with w = lr wd.

    Matrices of one shape class are orthogonalised in batches of at most `max_batch_elements`
    elements (bounds the four Newton–Schulz buffers at K2 scale; one batch per class at CPU sizes).
    `workspace` (a dict the caller keeps) holds those buffers between steps on CPU, where a
    fresh allocation of a few hundred MB page-faults on every step (~150 ms per 200 MB on a
    2-core EPYC); CUDA's caching allocator already reuses memory, so nothing is kept there.
    Row-sharded DTensor matrices take `_owner_update` (see the module docstring).
    """
    if not params:
        return
    for p in params:
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon takes 2-D matrices or stacked [E, out, in] tensors, "
                             f"got shape {tuple(p.shape)}")
    p_local = [local_tensor(p) for p in params]
    g_local = [local_tensor(g) for g in grads]
    m_local = [local_tensor(m) for m in momenta]
    for g, m in zip(g_local, m_local):
        torch.add(g, m, alpha=momentum, out=m)  # M = mu M + G in one pass
    nesterov_mu = momentum if nesterov else None
    decay = lr * weight_decay
    ns = dict(steps=ns_steps, coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype,
              max_batch_elements=max_batch_elements, workspace=workspace)

    # What Newton–Schulz works on: the local tensor when it holds whole matrices (a plain
    # tensor, or a stacked tensor sharded along E), else the DTensor itself.
    work = [p_local[i] if not is_dtensor(p) or _whole_matrices(p) else p for i, p in enumerate(params)]
    owned = [i for i, w in enumerate(work) if is_dtensor(w) and _row_sharded(w)]
    if owned:
        if decay:
            torch._foreach_mul_([p_local[i] for i in owned], 1.0 - decay)
        _owner_update([params[i] for i in owned], [g_local[i] for i in owned], [m_local[i] for i in owned],
                      [p_local[i] for i in owned], nesterov_mu, lr, ns)
    rest = [i for i in range(len(params)) if i not in set(owned)]

    def fill(i: int, e0: int, e1: int, slot: torch.Tensor) -> None:
        if is_dtensor(work[i]):  # any other sharding: every rank gathers the whole matrix
            slot.copy_(_full_input(work[i], g_local[i], m_local[i], nesterov_mu))
        elif nesterov:
            g, m = _rows(g_local[i], e0, e1), _rows(m_local[i], e0, e1)
            if slot.dtype == g.dtype:
                torch.add(g, m, alpha=momentum, out=slot)
            else:  # an add into another dtype makes a fresh temporary: reuse one (it stays in cache)
                tmp = _buffer(workspace, "nesterov", g.shape, g.dtype, g.device)
                slot.copy_(torch.add(g, m, alpha=momentum, out=tmp))
        else:
            slot.copy_(_rows(m_local[i], e0, e1))

    def scale(long: int) -> float:  # -s, or -s / w for the lerp form
        step = -lr * 0.2 * math.sqrt(long)
        return step / decay if decay else step

    specs = [(i, work[i].shape, p_local[i].device, is_dtensor(work[i])) for i in rest]
    # Updates come back in Newton–Schulz's dtype; each is cast through one kept buffer (the
    # largest parameter's size, so it stays in cache) right before it is applied.
    for batch in _orthogonalised(specs, fill, scale=scale, **ns):  # one shape class per batch
        for i, e0, e1, update in batch:
            if is_dtensor(work[i]):
                target, update = p_local[i], _local_rows(update, work[i])
            else:
                target = _rows(p_local[i], e0, e1)
            if update.dtype != target.dtype:
                update = _buffer(workspace, "update", update.shape, target.dtype, target.device).copy_(update)
            if decay:
                target.lerp_(update, decay)
            else:
                target.add_(update)


def _orthogonalised(specs, fill, *, steps, coefficients, eps, ns_dtype, max_batch_elements, workspace,
                    scale=None):
    """Newton–Schulz over matrices batched by shape class; `scale(long side)`, if given, is the
    factor each class's results are multiplied by.

    specs: (key, shape [..., rows, cols], device, whole) per tensor; a
    `whole` tensor is never split across batches. `fill(key, e0, e1, slot)` writes matrices
    e0:e1 of a tensor into `slot` (a view of the batch in the tensor's orientation). Yields,
    per batch, [(key, e0, e1, update)] with `update` in the tensor's shape and in `ns_dtype`
    (callers cast it, one tensor at a time, where they apply it), a view of
    a buffer that the next batch reuses: consume it before asking for the next.
    """
    # Shape classes: (rows, cols, device) -> [(key, matrices, ndim, whole)]. Tall and
    # wide matrices of one size are separate classes: each batch keeps its tensors' own
    # orientation, so filling it and reading the update back are contiguous passes (a
    # transposed copy or lerp is 7-13x slower on CPU) and Newton-Schulz transposes by flags.
    classes: dict[tuple[int, int, torch.device], list[tuple]] = {}
    for key, shape, device, whole in specs:
        count = shape[0] if len(shape) == 3 else 1
        classes.setdefault((*shape[-2:], device), []).append((key, count, len(shape), whole))
    for (rows, cols, device), members in classes.items():
        capacity = max(1, max_batch_elements // (rows * cols))  # matrices per Newton–Schulz batch
        ndims = {key: ndim for key, _, ndim, _ in members}
        for chunk in _chunks([(k, c) for k, c, _, _ in members], capacity, {k: w for k, _, _, w in members}):
            N = sum(e1 - e0 for _, e0, e1 in chunk)
            X = _buffer(workspace, "X", (N, rows, cols), ns_dtype, device)
            start = 0
            for key, e0, e1 in chunk:
                fill(key, e0, e1, _slot(X, start, e1 - e0, ndims[key]))
                start += e1 - e0
            O = zeropower_via_newtonschulz(X, steps, coefficients, eps, workspace,
                                           scale=1.0 if scale is None else scale(max(rows, cols)))
            out, start = [], 0
            for key, e0, e1 in chunk:
                out.append((key, e0, e1, _slot(O, start, e1 - e0, ndims[key])))
                start += e1 - e0
            yield out


def _buffer(workspace: dict | None, name: str, shape, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialised buffer of `shape`; on CPU a view of the front of one flat buffer per name
    kept in `workspace`, which grows to the largest size asked for: shape classes take turns
    with the same memory, so the workspace is the largest batch's, not the sum of all."""
    if workspace is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key, numel = (name, dtype, device), math.prod(shape)
    kept = workspace.get(key)
    if kept is None or kept.numel() < numel:
        kept = workspace[key] = torch.empty(numel, dtype=dtype, device=device)
    return kept[:numel].view(shape)


def _chunks(members: list[tuple[int, int]], capacity: int, whole: dict[int, bool]):
    """Split a shape class into Newton–Schulz batches of at most `capacity` matrices; yields
    lists of (key, first matrix, end matrix). A stacked tensor may span batches; a DTensor is
    gathered whole, so it is never split."""
    chunk, size = [], 0
    for i, count in members:
        e0 = 0
        while e0 < count:
            if size >= capacity:
                yield chunk
                chunk, size = [], 0
            e1 = count if whole[i] else min(count, e0 + capacity - size)
            chunk.append((i, e0, e1))
            size += e1 - e0
            e0 = e1
    if chunk:
        yield chunk


def _rows(t: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
    """Matrices e0:e1 of a stacked [E, out, in] tensor; a 2-D matrix is returned as is."""
    return t[e0:e1] if t.ndim == 3 else t


def _slot(batch: torch.Tensor, start: int, count: int, ndim: int) -> torch.Tensor:
    """The view of batch [N, rows, cols] that holds one parameter, in the parameter's shape."""
    view = batch[start : start + count]
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


# ---- distributed Muon: whole matrices, work spread over ranks ------------------------------

def _whole_matrices(t: torch.Tensor) -> bool:
    """A stacked [E, out, in] DTensor split only along E (FSDP2 or expert parallelism): its
    local shard is whole matrices, orthogonalised where they are."""
    return t.ndim == 3 and all(p.is_replicate() or (isinstance(p, Shard) and p.dim == 0)
                               for p in t.placements)


def _row_sharded(t: torch.Tensor) -> bool:
    """A 2-D DTensor split in row blocks and/or replicated (FSDP2's Shard(0), HSDP) over a mesh
    of every rank: the case `_owner_update` handles."""
    return (t.ndim == 2 and all(p.is_replicate() or (type(p) is Shard and p.dim == 0) for p in t.placements)
            and t.device_mesh.size() == dist.get_world_size())


def _row_ranges(t: torch.Tensor) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(rank, first row, end row, replica coordinates) of every rank's block of a row-sharded
    DTensor, cut at torch.chunk boundaries as DTensor and FSDP2 cut them (a rank past the end
    holds no rows)."""
    ranks = t.device_mesh.mesh
    out = []
    for coord in itertools.product(*(range(n) for n in ranks.shape)):
        start, length = 0, t.shape[0]
        for dim, placement in enumerate(t.placements):
            if placement.is_shard():
                chunk = -(-length // ranks.shape[dim])
                offset = min(coord[dim] * chunk, length)
                start, length = start + offset, min(chunk, length - offset)
        replica = tuple(c for c, p in zip(coord, t.placements) if p.is_replicate())
        out.append((int(ranks[coord]), start, start + length, replica))
    return out


def _exchange(chunks: list[list[torch.Tensor]], recv_sizes: list[int], dtype: torch.dtype,
              device: torch.device) -> list[torch.Tensor]:
    """One all_to_all_single over all ranks: chunks[r] (flat tensors) go to rank r; returns the
    flat buffer every rank sent here, recv_sizes[r] elements from rank r."""
    send_sizes = [sum(c.numel() for c in cs) for cs in chunks]
    flat = [c.to(dtype) for cs in chunks for c in cs]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes)
    return list(recv.split(recv_sizes))


def _owner_update(params: list[torch.Tensor], grads: list[torch.Tensor], momenta: list[torch.Tensor],
                  locals_: list[torch.Tensor], nesterov_mu: float | None, lr: float, ns: dict) -> None:
    """Distributed Muon for row-sharded matrices (K2_SPEC §2; Moonlight's ZeRO-1 scheme with the
    Newton–Schulz work divided instead of repeated).

    Every matrix gets one owner rank, largest first onto the rank with the least Newton–Schulz
    work so far (all ranks compute the same assignment from the shapes). One all_to_all brings
    each owner the row blocks of G + mu M of its matrices (from the holders in its own replica
    group); the owner orthogonalises its whole matrices in shape-class batches; a second
    all_to_all sends every rank, replicas included, the rows of the update it holds.
    """
    world, me = dist.get_world_size(), dist.get_rank()
    device, ns_dtype = locals_[0].device, ns["ns_dtype"]
    n = len(params)
    load, owner = [0] * world, [0] * n
    for i in sorted(range(n), key=lambda i: -newton_schulz_flops(params[i].shape)):
        candidates = params[i].device_mesh.mesh.flatten().tolist()
        owner[i] = min(candidates, key=lambda r: (load[r], r))
        load[owner[i]] += newton_schulz_flops(params[i].shape)
    ranges = [_row_ranges(p) for p in params]

    # Gather: row blocks of U = G + mu M to the owners.
    send: list[list[torch.Tensor]] = [[] for _ in range(world)]
    expect: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]  # (param, rows a:b) per source
    for i in range(n):
        owner_replica = next(rep for rank, _, _, rep in ranges[i] if rank == owner[i])
        for rank, a, b, rep in ranges[i]:
            if b <= a or rep != owner_replica:
                continue
            if rank == me:
                u = momenta[i] if nesterov_mu is None else torch.add(grads[i], momenta[i], alpha=nesterov_mu)
                send[owner[i]].append(u.flatten())
            if owner[i] == me:
                expect[rank].append((i, a, b))
    sizes = [sum((b - a) * params[i].shape[1] for i, a, b in blocks) for blocks in expect]
    full: dict[int, torch.Tensor] = {i: torch.empty(params[i].shape, dtype=ns_dtype, device=device)
                                     for i in range(n) if owner[i] == me}
    for blocks, buffer in zip(expect, _exchange(send, sizes, ns_dtype, device)):
        offset = 0
        for i, a, b in blocks:
            size = (b - a) * params[i].shape[1]
            full[i][a:b] = buffer[offset : offset + size].view(b - a, -1)
            offset += size

    # Orthogonalise this rank's share.
    results: dict[int, torch.Tensor] = {}
    specs = [(i, params[i].shape, device, False) for i in sorted(full)]
    for batch in _orthogonalised(specs, lambda i, e0, e1, slot: slot.copy_(full[i]), **ns):
        for i, _, _, update in batch:
            results[i] = update.to(locals_[i].dtype, copy=True)  # the next batch reuses its buffer

    # Scatter: each rank's rows of every update, from the owner.
    back: list[list[torch.Tensor]] = [[] for _ in range(world)]
    mine: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]  # (param, rows) per owner
    for i in range(n):
        for rank, a, b, _ in ranges[i]:
            if b <= a:
                continue
            if owner[i] == me:
                back[rank].append(results[i][a:b].flatten())
            if rank == me:
                mine[owner[i]].append((i, a, b))
    sizes = [sum((b - a) * params[i].shape[1] for i, a, b in blocks) for blocks in mine]
    for blocks, buffer in zip(mine, _exchange(back, sizes, locals_[0].dtype, device)):
        offset = 0
        for i, a, b in blocks:
            size = (b - a) * params[i].shape[1]
            update = buffer[offset : offset + size].view(b - a, -1).to(locals_[i].dtype)
            locals_[i].add_(update, alpha=-lr * 0.2 * math.sqrt(max(params[i].shape)))
            offset += size


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
