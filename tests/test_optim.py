import math

import pytest
import torch

from vla_razor.optim import StackedAdamW, lr_multiplier


def test_stacked_adamw_equals_torch_adamw_per_run():
    torch.manual_seed(0)
    init = torch.randn(3, 4, 2)
    lrs = torch.tensor([1e-3, 3e-2, 0.0])
    stacked = init.clone().requires_grad_()
    optimizer = StackedAdamW([stacked], weight_decay=0.01)
    singles = [init[i].clone().requires_grad_() for i in range(3)]
    torch_optimizers = [torch.optim.AdamW([p], lr=lr.item(), weight_decay=0.01) for p, lr in zip(singles, lrs)]
    targets = torch.randn(5, 3, 4, 2)
    for step in range(5):
        optimizer.zero_grad()
        ((stacked - targets[step]) ** 2).sum().backward()
        optimizer.step(lrs)
        for i, (p, opt) in enumerate(zip(singles, torch_optimizers)):
            opt.zero_grad()
            ((p - targets[step, i]) ** 2).sum().backward()
            opt.step()
    for i in range(3):
        torch.testing.assert_close(stacked[i].detach(), singles[i].detach())
    torch.testing.assert_close(stacked[2].detach(), init[2])     # lr 0 leaves a run frozen


def test_schedules():
    assert lr_multiplier(0, 100, 10, "constant_with_warmup") == pytest.approx(1 / 11)
    assert lr_multiplier(50, 100, 10, "constant_with_warmup") == 1.0
    assert lr_multiplier(10, 100, 10, "cosine_with_warmup") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine_with_warmup") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, 100, 10, "cosine_with_warmup") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="choose one of"):
        lr_multiplier(0, 10, 1, "linear")
