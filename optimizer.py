"""AdamW with fp32 master weights for half-precision parameters, for a run in one process.

With bf16 DeepSpeed wraps the optimizer in its ZeRO (or bf16) optimizer, which copies every gradient into an fp32
buffer, takes the norm tensor by tensor, scales the gradients for clipping in a pass of their own, steps, and copies
the result back (bench/results/raw/flash_call1_opt_freeze_*.txt: 33 ms per step for Freeze's 1.0 billion trainable
parameters on an H100, where the memory traffic of a mixed-precision Adam step needs about 14). On one process ZeRO-1
partitions nothing, so the training scripts hand DeepSpeed this optimizer instead (DeepSpeed then runs without its
own mixed precision) and the step is four passes over the trainable parameters: the gradient norm, the gradients
converted to fp32, one fused AdamW kernel over the fp32 masters (the clipping factor goes in as its `grad_scale`,
no pass of its own) and the copy back. No host synchronisation: the clipping factor stays on the device.

The arithmetic is DeepSpeed's: Adam on fp32 copies, gradients clipped to `max_grad_norm` by their global norm
(factor max_norm / (norm + 1e-6) when below 1), gradients accumulated in the parameters' dtype between steps.

On a GPU with Triton (which CUDA builds of torch bring) the last three passes are one: `adamw_one_pass` reads each
bf16 gradient, the fp32 master and its two moments once, and writes the moments, the master and the
bf16 parameter. Per parameter that is 28 bytes of memory traffic instead of 40 (the fp32 gradient is
never made); Freeze trains 1.0 billion parameters, so this is most of its optimizer step.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the step takes the three passes
    triton = None

if triton is not None:
    @triton.jit
    def adamw_one_pass_kernel(param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, divisor_ptr,
                              numel, lr, beta1, beta2, eps, weight_decay,
                              CLIPPED: tl.constexpr, BLOCK: tl.constexpr):
        """One AdamW step over BLOCK elements of one tensor, in the order torch's fused AdamW computes it."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        grad = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
        if CLIPPED:
            grad = grad / tl.load(divisor_ptr)
        master = tl.load(master_ptr + offsets, mask=inside)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=inside)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=inside)
        step = tl.load(step_ptr)  # already counted up for this step, on the device: no host synchronisation
        master = master - lr * weight_decay * master
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        bias_correction1 = 1 - tl.exp2(step * tl.log2(beta1))
        bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * tl.log2(beta2)))
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        master = master - (lr / bias_correction1) * exp_avg / denom
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=inside)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=inside)
        tl.store(master_ptr + offsets, master, mask=inside)
        # bf16 by rounding to nearest even on the bits: torch's .bfloat16() exactly, on every Triton version
        bits = master.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(param_ptr + offsets, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inside)


def one_pass_available(params):
    """The one-pass kernel runs on contiguous bf16 CUDA parameters, with Triton present."""
    return triton is not None and all(p.is_cuda and p.dtype == torch.bfloat16 and p.is_contiguous()
                                      for p in params)


def adamw_one_pass(param, grad, master, state, group, divisor, block=2048):
    """Launch the kernel on one parameter (its state's step must already count this step)."""
    numel = param.numel()
    beta1, beta2 = group["betas"]
    adamw_one_pass_kernel[(triton.cdiv(numel, block),)](
        param, grad.contiguous(), master, state["exp_avg"], state["exp_avg_sq"], state["step"],
        divisor if divisor is not None else state["step"], numel, group["lr"], beta1, beta2, group["eps"],
        group["weight_decay"], CLIPPED=divisor is not None, BLOCK=block)


class MasterWeightAdamW(torch.optim.AdamW):
    """`groups` are param groups of the model's parameters; AdamW itself sees fp32 copies of them (the masters)."""

    def __init__(self, groups, max_grad_norm=0.0, one_pass=True, **adamw):
        """The parameters must be on their training device already: the masters are made next to them.
        `one_pass=False` keeps the three passes where the one-pass kernel could run (for comparisons)."""
        self.model_params = [p for group in groups for p in group["params"]]
        masters = [{**group, "params": [p.detach().float() for p in group["params"]]} for group in groups]
        super().__init__(masters, **adamw)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        self.max_grad_norm = max_grad_norm
        self.one_pass = one_pass

    @torch.no_grad()
    def step(self, closure=None):
        pairs = [(p, m) for p, m in zip(self.model_params, self.masters) if p.grad is not None]
        if not pairs:
            return None
        self.step_pairs(pairs, self.clipping_divisor([p.grad for p, _ in pairs]))
        return None

    def step_pairs(self, pairs, scale):
        """AdamW on the masters of (parameter, master) pairs from the parameters' .grad, clipped by `scale` (a
        device tensor or None); the parameters get their updated masters."""
        if self.takes_one_pass([p for p, _ in pairs]):
            self.step_in_one_pass(pairs, scale)
            return
        for param, master in pairs:
            master.grad = param.grad.float()  # the same tensor when the parameter is fp32 already
        if self.defaults["fused"]:
            self.grad_scale = scale  # fused AdamW divides each gradient by it as it reads it
        elif scale is not None:
            torch._foreach_div_([m.grad for _, m in pairs], scale)
        torch.optim.AdamW.step(self)
        self.grad_scale = None
        copies = [(p, m) for p, m in pairs if p.data_ptr() != m.data_ptr()]
        if copies:
            torch._foreach_copy_([p for p, _ in copies], [m for _, m in copies])
        for _, master in pairs:
            master.grad = None

    def takes_one_pass(self, params):
        return self.one_pass and self.defaults["fused"] and one_pass_available(params)

    def step_in_one_pass(self, pairs, divisor):
        """What `step`'s three passes do (fp32 gradients, fused AdamW, the copy back), in one kernel per tensor."""
        master_of = {id(m): p for p, m in pairs}
        for group in self.param_groups:
            stepped = [(master_of[id(m)], m) for m in group["params"] if id(m) in master_of]
            for _, master in stepped:
                if not self.state[master]:  # the state torch's fused AdamW would make: checkpoints stay interchangeable
                    self.state[master] = {"step": torch.zeros((), dtype=torch.float32, device=master.device),
                                          "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}
            if stepped:
                torch._foreach_add_([self.state[m]["step"] for _, m in stepped], 1.0)
            for param, master in stepped:
                adamw_one_pass(param, param.grad, master, self.state[master], group, divisor)

    def clipping_divisor(self, grads):
        """max(1, (norm + 1e-6) / max_grad_norm) as a device tensor, or None without clipping."""
        if not self.max_grad_norm:
            return None
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        return torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach() for m in self.masters]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for master, saved, param in zip(self.masters, masters, self.model_params):
                    master.copy_(saved)
                    param.copy_(master)


class DataParallelAdamW(MasterWeightAdamW):
    """MasterWeightAdamW for N data-parallel processes, with the optimizer state partitioned as ZeRO-1 does.

    The trained parameters of each param group are laid out in one flat buffer (the parameters become views into
    it). Each process keeps the fp32 masters and Adam moments of one 1/N slice of it. A step is, per group: copy the
    gradients into a flat buffer, one reduce-scatter (each process gets the averaged gradient of its slice), then
    the clipping norm from the slices (one all-reduce of a number), the AdamW step on the slice (the one-pass kernel
    on a GPU), and one all-gather of the updated slices into the parameters. So LoRA or P-Tuning's few MB of
    gradients cost two collective calls a step, and Freeze's optimizer memory and step time are divided by N.

    fp32 parameters are their own masters. The state of each slice is saved by its process (`shard_state_dict`);
    `state_dict()` holds only the settings, since DeepSpeed saves one optimizer state, rank 0's."""

    ALIGN = 64  # slices start at multiples of 64 elements

    def __init__(self, groups, max_grad_norm=0.0, one_pass=True, **adamw):
        import torch.distributed as dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.flat_groups = []
        slices = []
        for group in groups:
            flat = FlatGroup(group["params"], self.rank, self.world_size, self.ALIGN)
            self.flat_groups.append(flat)
            slices.append({**group, "params": [flat.param_slice]})
        super().__init__(slices, max_grad_norm=max_grad_norm, one_pass=one_pass, **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        for flat in self.flat_groups:
            flat.reduce_scatter_gradients()
        grads = [flat.grad_slice for flat in self.flat_groups]
        scale = self.clipping_divisor(grads)
        pairs = [(flat.param_slice, master) for flat, master in zip(self.flat_groups, self.masters)]
        for (param, _), grad in zip(pairs, grads):
            param.grad = grad
        self.step_pairs(pairs, scale)
        for param, _ in pairs:
            param.grad = None
        for flat in self.flat_groups:
            flat.all_gather_parameters()
        return None

    def clipping_divisor(self, grad_slices):
        """The global norm of the averaged gradients, from each process's slices (one all-reduce of a number)."""
        if not self.max_grad_norm:
            return None
        import torch.distributed as dist
        squares = torch.stack([(g.float() ** 2).sum() for g in grad_slices]).sum()
        dist.all_reduce(squares)
        return torch.clamp((squares.sqrt() + 1e-6) / self.max_grad_norm, min=1.0)

    def state_dict(self):
        return {"data_parallel": self.world_size, "param_groups": torch.optim.AdamW.state_dict(self)["param_groups"]}

    def load_state_dict(self, state_dict):
        pass  # each process reads its own slice's state: load_shard_state_dict

    def shard_state_dict(self):
        return MasterWeightAdamW.state_dict(self)

    def load_shard_state_dict(self, state_dict):
        MasterWeightAdamW.load_state_dict(self, state_dict)
        with torch.no_grad():
            for flat, master in zip(self.flat_groups, self.masters):
                flat.param_slice.copy_(master)
            for flat in self.flat_groups:
                flat.all_gather_parameters()


class FlatGroup:
    """One param group's parameters as views into one flat buffer, its gradient buffer, and this process's slice."""

    def __init__(self, params, rank, world_size, align):
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"the trained parameters of a group must share one dtype, not {sorted(map(str, dtypes))}")
        device = params[0].device
        total = sum(p.numel() for p in params)
        chunk = world_size * align
        padded = (total + chunk - 1) // chunk * chunk
        self.params = params
        self.param_flat = torch.zeros(padded, dtype=params[0].dtype, device=device)
        self.grad_flat = torch.zeros_like(self.param_flat)
        offset = 0
        self.views = []
        with torch.no_grad():
            for p in params:
                view = self.param_flat[offset:offset + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                self.views.append((offset, p.numel()))
                offset += p.numel()
        size = padded // world_size
        self.param_slice = self.param_flat[rank * size:(rank + 1) * size]
        self.grad_slice = torch.empty_like(self.param_slice)
        self.world_size = world_size

    def reduce_scatter_gradients(self):
        import torch.distributed as dist
        grads, targets = [], []
        for p, (offset, n) in zip(self.params, self.views):
            target = self.grad_flat[offset:offset + n]
            if p.grad is None:
                target.zero_()
            else:
                grads.append(p.grad.reshape(-1))
                targets.append(target)
        if targets:
            torch._foreach_copy_(targets, grads)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch >= 2.12
        reduce_scatter(self.grad_slice, self.grad_flat, op=dist.ReduceOp.AVG)

    def all_gather_parameters(self):
        import torch.distributed as dist
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.12
        all_gather(self.param_flat, self.param_slice)
