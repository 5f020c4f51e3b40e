"""The optimizer a module builds: torch's fused Adam(W) kernel where the configuration chose no implementation
(issue 27: on CPU torch otherwise loops over the parameters), the user's choice kept where they made one, and
the same update either way."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from lightning_pref.base_module import fused_adam


def _params(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]


def test_adamw_without_an_implementation_gets_the_fused_kernel_and_keeps_its_groups():
    params = _params()
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 0.1}, {"params": params[1:]}], lr=0.01,
                                  weight_decay=0.3, eps=1e-6)
    fused = fused_adam(optimizer)
    assert type(fused) is torch.optim.AdamW
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert [g["lr"] for g in fused.param_groups] == [0.1, 0.01]
    assert all(g["weight_decay"] == 0.3 and g["eps"] == 1e-6 for g in fused.param_groups)
    assert [p for g in fused.param_groups for p in g["params"]] == params


@pytest.mark.parametrize("factory", [partial(torch.optim.AdamW, foreach=False), partial(torch.optim.AdamW, fused=False),
                                     partial(torch.optim.Adam, foreach=True), torch.optim.SGD])
def test_a_chosen_implementation_or_another_optimizer_is_kept(factory):
    kwargs = {"lr": 0.1} if factory is torch.optim.SGD else {}
    optimizer = factory(_params(), **kwargs)
    assert fused_adam(optimizer) is optimizer


def test_the_fused_step_is_the_loop_step():
    """Same parameters after three steps of both implementations (fp32 rounding)."""
    loop_params, fused_params = _params(), _params()
    loop = torch.optim.AdamW(loop_params, lr=0.05, foreach=False)
    fused = fused_adam(torch.optim.AdamW(fused_params, lr=0.05))
    assert fused.param_groups[0]["fused"]
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in loop_params]
        for params, optimizer in ((loop_params, loop), (fused_params, fused)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(loop_params, fused_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
