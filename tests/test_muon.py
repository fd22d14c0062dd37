"""Muon against independent references: torch.optim.Muon (2-D) and a per-matrix loop (stacked experts)."""

import contextlib

import pytest
import torch
import torch.optim._muon as torch_muon

from openk2.optim import Muon, muon_update, newton_schulz_flops, zeropower_via_newtonschulz
from openk2.optim.muon import NS_COEFFICIENTS

LR, WD = 0.02, 0.1




@contextlib.contextmanager
def torch_muon_in_fp32():
    """torch.optim.Muon hard-codes `grad.bfloat16()` before Newton–Schulz; make that cast a copy so
    its own code (coefficients, transpose, normalisation, addmm form, eps) runs in float32."""
    original = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self.clone()
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = original


def _pair(shapes):
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    return ours, ref


def test_torch_muon_defaults_are_k2s():
    """What the comparison relies on: torch's constants are the ones K2_SPEC §2 names."""
    assert (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C) == NS_COEFFICIENTS
    assert torch_muon.DEFAULT_NS_STEPS == 5
    assert torch_muon._adjust_lr(1.0, "match_rms_adamw", torch.Size([64, 256])) == pytest.approx(0.2 * 16)


def test_matches_torch_muon_over_ten_steps_fp32():
    shapes = [(64, 32), (32, 64), (48, 48), (17, 40), (32, 64)]  # tall, wide, square, odd, a repeated shape
    ours, ref = _pair(shapes)
    start = [p.detach().clone() for p in ours]
    opt = Muon(ours, lr=LR, weight_decay=WD, momentum=0.95, ns_dtype="float32")
    reference = torch.optim.Muon(ref, lr=LR, weight_decay=WD, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw")
    for step in range(10):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        if step == 4:  # a parameter without gradient is skipped (and the batch shrinks)
            ours[1].grad = ref[1].grad = None
        opt.step()
        with torch_muon_in_fp32():
            reference.step()
    for a, b, w in zip(ours, ref, start):
        assert (a - b).abs().max() < 1e-5
        assert (a - w).abs().max() > 1e-2  # and the parameters did move


def test_bf16_newton_schulz_close_to_torch_default():
    """torch.optim.Muon's own bf16 path: same update up to bf16 rounding."""
    shapes = [(64, 32), (32, 96)]
    ours, ref = _pair(shapes)
    opt = Muon(ours, lr=LR, weight_decay=0.0, ns_dtype="bfloat16")
    reference = torch.optim.Muon(ref, lr=LR, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    before = [p.detach().clone() for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    opt.step()
    reference.step()
    for a, b, w in zip(ours, ref, before):
        da, db = (a - w).flatten(), (b - w).flatten()
        assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.995
        assert (da - db).abs().max() < 0.15 * db.abs().max()


def _reference_step(W, G, M, lr, wd, mu=0.95, steps=5):
    """Per-matrix loop, written out from K2_SPEC §2 (float32, one matrix at a time)."""
    M.mul_(mu).add_(G)
    U = G + mu * M
    tall = U.shape[0] > U.shape[1]
    X = U.T if tall else U
    X = X / X.norm().clamp_min(1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    O = X.T if tall else X
    W.mul_(1 - lr * wd).add_(O, alpha=-lr * 0.2 * max(W.shape) ** 0.5)


@pytest.mark.parametrize("batch_elements", [1 << 27, 4 * 24 * 40], ids=["one_batch", "batches_of_4"])
def test_stacked_experts_equal_per_matrix_loop(batch_elements):
    E, inter, hidden = 6, 24, 40
    gate, up = torch.randn(E, inter, hidden), torch.randn(E, inter, hidden)
    down = torch.randn(E, hidden, inter)
    plain = torch.randn(inter, hidden)  # same shape class as gate/up: batched with them
    params = [t.clone() for t in (gate, up, down, plain)]
    momenta = [torch.zeros_like(t) for t in params]
    ref_w = [t.clone() for t in params]
    ref_m = [torch.zeros_like(t) for t in params]
    for _ in range(3):
        grads = [torch.randn_like(t) for t in params]
        muon_update(params, grads, momenta, lr=LR, weight_decay=WD, max_batch_elements=batch_elements)
        for W, G, M in zip(ref_w, grads, ref_m):
            if W.ndim == 3:
                for e in range(E):
                    _reference_step(W[e], G[e], M[e], LR, WD)
            else:
                _reference_step(W, G, M, LR, WD)
    for p, W in zip(params, ref_w):
        assert (p - W).abs().max() < 1e-6
    for m, M in zip(momenta, ref_m):
        torch.testing.assert_close(m, M, rtol=1e-6, atol=1e-6)  # one fused pass vs mul_ + add_


def test_newton_schulz_is_nearly_orthogonal():
    X = torch.randn(4, 32, 80)
    O = zeropower_via_newtonschulz(X.clone())
    singular = torch.linalg.svdvals(O)
    assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic lands in about [0.7, 1.2]
    m, n = 32, 80  # wide enough for the Gram form: 4 products of [m, m] x [m, n], 14 of [m, m]^2
    assert newton_schulz_flops((4, n, m)) == 4 * (4 * 2 * m * m * n + 14 * 2 * m**3)
    assert newton_schulz_flops((48, 48)) == 5 * (4 * 48**3 + 2 * 48**3)  # square: the plain form


def _decaying_spectrum(N: int, m: int, n: int) -> torch.Tensor:
    """Matrices whose singular values fall from 1 to 1e-4, as gradients' do."""
    U = torch.linalg.qr(torch.randn(N, m, m))[0]
    V = torch.linalg.qr(torch.randn(N, n, m))[0]
    return U @ torch.diag_embed(torch.logspace(0, -4, m).expand(N, m)) @ V.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_newton_schulz_matches_the_plain_iteration(monkeypatch, dtype):
    """Wide matrices run Newton–Schulz on their Gram matrix; it must give the plain iteration's
    result (float32: to rounding; bf16: no further from float64 than the plain form, and no
    blow-up on a decaying spectrum, which an un-restarted Gram iteration shows)."""
    import openk2.optim.muon as muon

    torch.manual_seed(0)
    for G in (torch.randn(6, 32, 96), _decaying_spectrum(6, 32, 96)):
        assert muon._gram_is_cheaper(32, 96, 5)
        gram = zeropower_via_newtonschulz(G.to(dtype, copy=True), scale=0.5).double()
        with monkeypatch.context() as plain_only:
            plain_only.setattr(muon, "_gram_is_cheaper", lambda *shape: False)
            plain = zeropower_via_newtonschulz(G.to(dtype, copy=True), scale=0.5).double()
            exact = zeropower_via_newtonschulz(G.double(), scale=0.5)
        if dtype == torch.float32:
            assert (gram - plain).abs().max() < 1e-5
        else:
            assert (gram - exact).norm() < 2 * (plain - exact).norm()
        singular = torch.linalg.svdvals(gram / 0.5)
        assert singular.max() < 1.3


def test_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


@pytest.mark.parametrize("shape", [(5, 32, 96), (5, 48, 48), (5, 40, 56)], ids=["gram", "square", "plain"])
def test_tall_batch_equals_the_transposed_wide_one(shape):
    """A tall batch is orthogonalised as it lies (transposed products), not copied to wide."""
    import openk2.optim.muon as muon

    torch.manual_seed(0)
    wide = torch.randn(shape)
    assert muon._gram_is_cheaper(*shape[1:], 5) == (shape[2] >= 2 * shape[1])
    tall = wide.mT.contiguous()
    expected = zeropower_via_newtonschulz(wide.clone(), scale=0.3)
    result = zeropower_via_newtonschulz(tall, scale=0.3)
    assert result.shape == tall.shape and result.is_contiguous()
    torch.testing.assert_close(result, expected.mT, rtol=0, atol=1e-5)


def _benchmark(name: str):
    """benchmarks/<name>.py as a module. benchmarks/ and experiments/ each hold a `common.py`, so
    the other folder's `common` (if a test imported it) is set aside while this one loads."""
    import importlib
    import sys
    from pathlib import Path

    saved = sys.modules.pop("common", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
        sys.modules.pop("common", None)
        if saved is not None:
            sys.modules["common"] = saved


def test_benchmark_float32_peer_is_torch_muon_with_openk2s_newton_schulz():
    """benchmarks/optimizer_step.py's second peer swaps torch.optim.Muon's Newton–Schulz for
    float32_newton_schulz; its ratio against openk2's float32 step compares the same math only if
    the swapped-in function is torch's algorithm and openk2's float32 result."""
    bench = _benchmark("optimizer_step")
    g = torch.Generator().manual_seed(0)
    args = (NS_COEFFICIENTS, 5, torch_muon.EPS)
    for shape in [(64, 32), (32, 96), (48, 48)]:
        grad = torch.randn(shape, generator=g)
        peer = bench.float32_newton_schulz(grad, *args)
        assert peer.dtype == torch.float32 and peer.shape == grad.shape
        ours = zeropower_via_newtonschulz(grad[None].clone())[0]  # it overwrites its input
        assert (peer - ours).abs().max() < 1e-5
        with torch_muon_in_fp32():  # torch's own code, in float32
            assert (peer - torch_muon._zeropower_via_newtonschulz(grad, *args)).abs().max() < 1e-5
    ours, ref = _pair([(64, 32), (32, 64)])
    opt = Muon(ours, lr=LR, weight_decay=WD, ns_dtype="float32")
    reference = torch.optim.Muon(ref, lr=LR, weight_decay=WD, nesterov=True, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        with bench.patched(torch_muon, "_zeropower_via_newtonschulz", bench.float32_newton_schulz):
            reference.step()
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() < 1e-5
