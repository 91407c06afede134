"""MasterWeightAdamW: DeepSpeed's mixed-precision AdamW step (fp32 masters, global-norm clipping), on the CPU."""
import pytest
import torch

from optimizer import MasterWeightAdamW


def bf16_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(16, 8).bfloat16()), torch.nn.Parameter(torch.randn(8).bfloat16()),
            torch.nn.Parameter(torch.randn(4).bfloat16())]  # the last never gets a gradient


def gradients(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(16, 8, generator=g).bfloat16() * 10, torch.randn(8, generator=g).bfloat16() * 10, None]


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("fused", [False, True])
def test_steps_equal_adamw_on_fp32_copies_with_clipped_fp32_gradients(max_grad_norm, fused):
    params = bf16_params()
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    optimizer = MasterWeightAdamW(groups, max_grad_norm=max_grad_norm, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  fused=fused)
    # the reference: what DeepSpeed's bf16 optimizer does, written plainly
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW([{"params": masters[:1], "weight_decay": 0.1},
                                   {"params": masters[1:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        for p, m, g in zip(params, masters, gradients(step)):
            p.grad = g
            m.grad = None if g is None else g.float()
        if max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack([m.grad.norm() for m in masters if m.grad is not None]))
            assert norm > max_grad_norm  # clipping really happens
            for m in masters:
                if m.grad is not None:
                    m.grad *= max_grad_norm / (norm + 1e-6)
        optimizer.step()
        reference.step()
        for p, m in zip(params, masters):
            assert torch.equal(p.detach(), m.detach().bfloat16())
        for mine, theirs in zip(optimizer.masters, masters):
            assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    assert torch.equal(params[2].detach(), bf16_params()[2].detach())  # no gradient, no update


def test_state_dict_carries_the_masters_and_restores_the_parameters():
    params = bf16_params()
    optimizer = MasterWeightAdamW([{"params": params, "weight_decay": 0.0}], max_grad_norm=1.0, lr=1e-3)
    for step in range(2):
        for p, g in zip(params, gradients(step)):
            p.grad = g
        optimizer.step()
    saved = optimizer.state_dict()
    masters = [m.clone() for m in optimizer.masters]
    fresh_params = bf16_params()  # as a resumed run starts: the parameters as saved (bf16), a new optimizer
    fresh = MasterWeightAdamW([{"params": fresh_params, "weight_decay": 0.0}], max_grad_norm=1.0, lr=1e-3)
    fresh.load_state_dict(saved)
    for mine, theirs in zip(fresh.masters, masters):
        assert torch.equal(mine, theirs)  # fp32, not the bf16 rounding of the parameters
    for p, q in zip(fresh_params, params):
        assert torch.equal(p, q)
    assert fresh.state[fresh.masters[0]]["exp_avg"].dtype == torch.float32


def test_fp32_parameters_are_updated_in_place():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = MasterWeightAdamW([{"params": [param], "weight_decay": 0.0}], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.masters[0].data_ptr() == param.data_ptr() and torch.allclose(param, torch.full((3,), 0.9))
