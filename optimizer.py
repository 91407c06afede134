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
"""
import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """`groups` are param groups of the model's parameters; AdamW itself sees fp32 copies of them (the masters)."""

    def __init__(self, groups, max_grad_norm=0.0, **adamw):
        """The parameters must be on their training device already: the masters are made next to them."""
        self.model_params = [p for group in groups for p in group["params"]]
        masters = [{**group, "params": [p.detach().float() for p in group["params"]]} for group in groups]
        super().__init__(masters, **adamw)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        pairs = [(p, m) for p, m in zip(self.model_params, self.masters) if p.grad is not None]
        if not pairs:
            return None
        grads = [p.grad for p, _ in pairs]
        scale = self.clipping_divisor(grads)
        for (_, master), grad in zip(pairs, grads):
            master.grad = grad.float()  # the same tensor when the parameter is fp32 already
        if self.defaults["fused"]:
            self.grad_scale = scale  # fused AdamW divides each gradient by it as it reads it
        elif scale is not None:
            torch._foreach_div_([m.grad for _, m in pairs], scale)
        super().step()
        self.grad_scale = None
        copies = [(p, m) for p, m in pairs if p.data_ptr() != m.data_ptr()]
        if copies:
            torch._foreach_copy_([p for p, _ in copies], [m for _, m in copies])
        for _, master in pairs:
            master.grad = None
        return None

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
