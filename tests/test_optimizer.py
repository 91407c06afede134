"""MasterWeightAdamW: DeepSpeed's mixed-precision AdamW step (fp32 masters, global-norm clipping), on the CPU;
DataParallelAdamW: the same step over two processes (gloo), each stepping half of the parameters."""
import copy

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass kernel needs a GPU (and Triton)")
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_one_pass_kernel_equals_the_three_passes(max_grad_norm):
    """The Triton kernel against the same optimizer's foreach path (fp32 gradients, torch's fused AdamW, copy back),
    on sizes that are and are not multiples of its block, with weight decay, then through a checkpoint round trip."""
    import optimizer as optimizer_module
    assert optimizer_module.one_pass_available([torch.zeros(1, device="cuda", dtype=torch.bfloat16)])
    torch.manual_seed(0)
    shapes = [(384, 96), (3000,), (7,)]
    start = [torch.randn(s, device="cuda").bfloat16() for s in shapes]

    def make(one_pass, params=None):
        params = params or [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        return params, MasterWeightAdamW(groups, max_grad_norm=max_grad_norm, one_pass=one_pass,
                                         lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def step(pairs, k):
        g = torch.Generator(device="cuda").manual_seed(100 + k)
        grads = [torch.randn(s, device="cuda", generator=g).bfloat16() * 10 for s in shapes]
        for params, optimizer in pairs:
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            optimizer.step()

    one, three = make(True), make(False)
    assert one[1].takes_one_pass(one[0]) and not three[1].takes_one_pass(three[0])
    for k in range(3):
        step([one, three], k)
    # a resumed run: the one-pass state loads into a three-pass optimizer and both go on alike
    resumed = make(False, [torch.nn.Parameter(p.detach().clone()) for p in one[0]])
    resumed[1].load_state_dict(copy.deepcopy(one[1].state_dict()))  # as from a file: no tensor shared
    for k in range(3, 5):
        step([one, three, resumed], k)
    for params, optimizer in (three, resumed):
        for mine, theirs in zip(one[1].masters, optimizer.masters):
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(one[1].state[mine][key], optimizer.state[theirs][key], rtol=1e-5, atol=1e-6)
    for p, master in zip(one[0], one[1].masters):
        assert torch.equal(p.detach(), master.bfloat16())  # the parameter is its master rounded
        assert float(one[1].state[master]["step"]) == 5


def data_parallel_worker(rank, init_file, dtype, max_grad_norm, results):
    """One of two processes: DataParallelAdamW on this rank's gradients, saved and resumed after two steps."""
    import torch.distributed as dist
    from optimizer import DataParallelAdamW
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        def make():
            params = [torch.nn.Parameter(p.detach().to(dtype)) for p in bf16_params()]
            groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
            return params, DataParallelAdamW(groups, max_grad_norm=max_grad_norm, lr=1e-2, betas=(0.9, 0.95),
                                             eps=1e-8)
        params, optimizer = make()
        for step in range(4):
            if step == 2:  # a resumed run: fresh parameters and optimizer, this rank's saved slice state
                saved = copy.deepcopy(optimizer.shard_state_dict())
                params, optimizer = make()
                optimizer.load_shard_state_dict(saved)
            for p, g in zip(params, rank_gradients(step, rank)):
                p.grad = None if g is None else g.to(dtype)
            optimizer.step()
        results[rank] = [p.detach().clone() for p in params]
        results[f"grads{rank}"] = [flat.grad_slice.clone() for flat in optimizer.flat_groups]
    finally:
        dist.destroy_process_group()


def rank_gradients(step, rank):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(16, 8, generator=g).bfloat16() * 10, torch.randn(8, generator=g).bfloat16() * 10,
            torch.zeros(4).bfloat16()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_data_parallel_steps_equal_one_process_on_the_averaged_gradients(tmp_path, dtype, max_grad_norm):
    import torch.multiprocessing as mp
    from optimizer import MasterWeightAdamW
    results = mp.Manager().dict()
    mp.spawn(data_parallel_worker, args=(str(tmp_path / "init"), dtype, max_grad_norm, results), nprocs=2)
    # one process on the mean of the two ranks' gradients (the mean rounded to the parameters' dtype, as the
    # reduction leaves it)
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in bf16_params()]
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    reference = MasterWeightAdamW(groups, max_grad_norm=max_grad_norm, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        for p, g0, g1 in zip(params, rank_gradients(step, 0), rank_gradients(step, 1)):
            p.grad = ((g0.to(dtype).float() + g1.to(dtype).float()) / 2).to(dtype)
        reference.step()
    assert results[0][0].abs().sum() > 0
    # what the reduce-scatter left each rank: its slice of the mean gradient of each group (padded with zeros)
    for group_params, slices in zip((params[:1], params[1:]), zip(results["grads0"], results["grads1"])):
        mean = torch.cat([p.grad.reshape(-1) for p in group_params])
        assert torch.equal(torch.cat(slices)[:mean.numel()], mean)
        assert not torch.cat(slices)[mean.numel():].any()
    for rank in (0, 1):
        for mine, theirs in zip(results[rank], params):
            assert mine.dtype == dtype
            assert torch.allclose(mine.float(), theirs.detach().float(), rtol=1e-5, atol=1e-6)
