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
