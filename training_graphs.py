"""The forward and backward of a training step, captured as CUDA graphs (one pair per batch shape) and replayed.

A 6B step at batch 2 is short for the GPU but long for the host: even with compiled blocks, Python launches the
kernels of 28 block forwards and backwards, autograd's bookkeeping and the loss. Replaying a captured graph
launches all of them at once. What this needs, and how it is met:
- fixed shapes: batches are padded to a multiple of 64 tokens (`--pad_to_multiple_of`) and the labelled positions
  come from the collator as a padded index (`data_set.labelled_positions`), so a run sees a few dozen shapes;
  each is captured the first time it is seen (about a second) and replayed after;
- no host synchronisation inside: the loss selects its positions with that index, not a boolean mask;
- the optimizer stays outside: `TrainingGraphs(model)(batch)` returns a loss whose `backward()` (DeepSpeed's
  `engine.backward`) replays the backward graph and hands the gradients of the trainable parameters to autograd,
  so DeepSpeed's gradient hooks, loss scaling, clipping and optimizer step run as they always do;
- the captured graphs differentiate with respect to stand-ins of the trainable parameters (same storage, made here):
  DeepSpeed keeps the real parameters' gradient accumulators alive from its set-up on the default stream, and a
  backward into them would make the capture depend on that stream, which CUDA refuses.
All graphs share one memory pool: a shape's activations live only between its own forward and backward replay.
"""
import time

import torch
from torch.func import functional_call


class CapturedShape:
    """The graphs and static tensors of one batch shape."""

    def __init__(self, inputs, loss, grad_of_loss, forward_graph, backward_graph):
        self.inputs, self.loss, self.grad_of_loss = inputs, loss, grad_of_loss
        self.forward_graph, self.backward_graph = forward_graph, backward_graph


class ReplayStep(torch.autograd.Function):
    """Autograd's view of a captured step: trainable parameters in, loss out; backward replays the other graph."""

    @staticmethod
    def forward(ctx, graphs, shape, *trainable):
        ctx.graphs, ctx.shape = graphs, shape
        shape.forward_graph.replay()
        return shape.loss.detach()

    @staticmethod
    def backward(ctx, grad_of_loss):
        ctx.shape.grad_of_loss.copy_(grad_of_loss)
        ctx.shape.backward_graph.replay()
        # the shared buffers are returned as they are: autograd copies or adds them into .grad (it does not take
        # over a tensor somebody else still holds), and they are consumed before the next replay overwrites them
        return (None, None, *ctx.graphs.grads)


class ForwardWithoutHooks(torch.nn.Module):
    """Calls the model's forward itself: DeepSpeed's engine hangs hooks on the model (timers that synchronise
    with the GPU), which must not run inside a capture. The eager path calls them through the engine anyway."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model.forward(**kwargs)


class TrainingGraphs:
    """`graphs(batch)` -> the mean token loss of `model(**batch, loss_only=True)`, computed by graph replay.

    `batch` holds CPU tensors (input_ids, labels, label_positions). `warmup` eager steps precede the first capture
    (on a side stream, as CUDA graphs require: they compile the blocks and let the libraries make their workspaces);
    `later_warmup` precede each later one. `captures` and `capture_seconds` count what capturing has cost."""

    def __init__(self, model, device, warmup=2, later_warmup=2):
        self.model, self.device = ForwardWithoutHooks(model), device
        self.warmup, self.later_warmup = warmup, later_warmup
        self.captures, self.capture_seconds = 0, 0.0
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.names, self.trainable = [name for name, _ in named], [p for _, p in named]
        self.grads = [torch.zeros_like(p) for p in self.trainable]  # where every shape's backward leaves them
        self.pool = torch.cuda.graph_pool_handle()
        self.shapes = {}
        self.make_stand_ins()

    def make_stand_ins(self):
        """Leaves sharing the trainable parameters' storage, so the optimizer's updates are what the graphs read."""
        self.stand_ins = [p.detach().requires_grad_() for p in self.trainable]
        self.shapes.clear()

    def __call__(self, batch):
        if any(s.data_ptr() != p.data_ptr() for s, p in zip(self.stand_ins, self.trainable)):
            self.make_stand_ins()  # a parameter was given new storage: the captured addresses are stale
        key = tuple((name, tuple(t.shape)) for name, t in sorted(batch.items()))
        shape = self.shapes.get(key)
        if shape is None:
            start = time.perf_counter()
            shape = self.shapes[key] = self.capture(batch, self.warmup if not self.captures else self.later_warmup)
            torch.cuda.synchronize(self.device)
            self.captures, self.capture_seconds = self.captures + 1, self.capture_seconds + time.perf_counter() - start
        for name, t in batch.items():
            shape.inputs[name].copy_(t, non_blocking=True)
        return ReplayStep.apply(self, shape, *self.trainable)

    def loss(self, inputs):
        parameters = dict(zip(self.names, self.stand_ins))
        return functional_call(self.model, parameters, args=(), kwargs={**inputs, "loss_only": True}, strict=False).loss

    def capture(self, batch, warmup):
        inputs = {name: t.to(self.device) for name, t in batch.items()}
        grad_of_loss = torch.ones((), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                torch.autograd.grad(self.loss(inputs), self.stand_ins, grad_of_loss, allow_unused=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward_graph, pool=self.pool):
            loss = self.loss(inputs)
        with torch.cuda.graph(backward_graph, pool=self.pool):
            grads = torch.autograd.grad(loss, self.stand_ins, grad_of_loss, allow_unused=True)
            for buffer, grad in zip(self.grads, grads):
                if grad is None:
                    buffer.zero_()
                else:
                    buffer.copy_(grad)
        # keep the loss's value, not its autograd graph (which would keep this capture's accumulators alive)
        return CapturedShape(inputs, loss.detach(), grad_of_loss, forward_graph, backward_graph)
