"""Every method trains: a few optimiser steps on a tiny 2D and a tiny 3D problem reduce the loss,
and the frozen base weights do not move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import monai_peft as mp
from tests.helpers import first
from tests.method_cases import params


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


@pytest.mark.parametrize("case", params())
def test_a_few_steps_reduce_the_loss(case):
    torch.manual_seed(0)
    net = case.net()
    model = mp.get_peft_model(net, mp.get_config(case.method, **case.kwargs))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(case.shape)
    model.train()
    with torch.no_grad():
        out = first(model(x))
    if out.dim() > 2:  # segmentation: a learnable voxel-wise target (foreground = bright voxels)
        target = (x[:, 0] > 0.5).long()
    else:  # classification: fit the labels of a fixed batch
        target = torch.arange(out.shape[0]) % out.shape[1]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(first(model(x)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn(first(model(x)), target).item()
    model.train()
    with torch.no_grad():
        final_train = loss_fn(first(model(x)), target).item()
    assert min(final, final_train) < losses[0] - 1e-3, (losses, final)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
