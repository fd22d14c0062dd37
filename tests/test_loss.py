import pytest
import torch
import torch.nn.functional as F

import openk2.train.loss as loss_module
from openk2.train.loss import IGNORE, linear_cross_entropy


@pytest.mark.parametrize("rows, vocab", [(7, 50), (300, 4096), (1, 3), (0, 5)])
@pytest.mark.parametrize("recompute", [False, True, None])
@pytest.mark.parametrize("onednn", [True, False])
def test_matches_cross_entropy_and_its_gradients(rows, vocab, recompute, onednn, monkeypatch):
    if not onednn:  # the plain torch product the logits fall back to without oneDNN
        monkeypatch.setattr(loss_module, "onednn_supports", lambda *tensors: False)
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::3] = IGNORE
    ours = linear_cross_entropy(hidden, weight, targets, recompute=recompute)
    (ours * 0.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_several_chunks_with_a_short_last_one(recompute, monkeypatch):
    """300 rows in chunks of 128 (128 + 128 + 44): the head gradient is written by the first
    chunk and summed over the others, the hidden-state gradient filled chunk by chunk."""
    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab, device_type: 128)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 16, generator=g, requires_grad=True)
    weight = torch.randn(96, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 96, (300,), generator=g)
    targets[250:] = IGNORE  # the last chunk mostly ignored
    ours = linear_cross_entropy(hidden, weight, targets, recompute=recompute)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_rows_whose_target_probability_underflows_keep_their_exact_loss(recompute):
    """A per-token loss far above 87 (target probability below float32's normal range): read off
    the softmax it would be inf or wrong; those rows take the exact log-sum-exp instead."""
    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(40, 8, generator=g) * 30).requires_grad_()
    weight = (torch.randn(64, 8, generator=g) * 30).requires_grad_()
    targets = torch.randint(0, 64, (40,), generator=g)
    targets[::5] = IGNORE
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="none")
    assert ref.max() > 1000  # the case under test is there
    ref = ref.sum()
    ours = linear_cross_entropy(hidden, weight, targets, recompute=recompute)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), ref.detach(),
                                   rtol=1e-5, atol=1e-3)


def test_chunk_rows():
    """CPU: 512 rows up to 64 MiB of float32 logits; accelerators: ~16 MiB; never under 128."""
    assert loss_module.chunk_rows(8192, "cpu") == loss_module.chunk_rows(32768, "cpu") == 512
    assert loss_module.chunk_rows(163840, "cpu") == 128
    assert loss_module.chunk_rows(4096, "cuda") == 1024
    assert loss_module.chunk_rows(32768, "cuda") == loss_module.chunk_rows(163840, "cuda") == 128


def test_a_second_backward_through_gradients_made_in_the_forward_is_refused():
    """The in-forward gradients are scaled in place by their one backward; a second one (kept
    graph) must fail loudly rather than scale them twice. The recomputing path allows it."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 20, (12,), generator=g)
    loss = linear_cross_entropy(hidden, weight, targets, recompute=False)
    (loss * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*recompute=True"):
        loss.backward()
    hidden.grad = weight.grad = None
    again = linear_cross_entropy(hidden, weight, targets, recompute=True)
    again.backward(retain_graph=True)
    first = weight.grad.clone()
    again.backward()
    torch.testing.assert_close(weight.grad, 2 * first)
