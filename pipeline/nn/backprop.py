"""The replica stack's training step by hand: its forward and backward as flat tensor calls.

At batch 32 autograd's bookkeeping (recording the graph, walking it back) and nn.Module's calls
cost more than the arithmetic. `Backprop` runs the kernels autograd runs for the step (the
backward ones `torch.ops.aten.*_backward`, as autograd's nodes call them) on the same views, in
the same order, into buffers made once: autograd's gradients and running statistics bit for bit
(tests/test_backprop.py; pipeline/nn/fastpath.py checks it at run time and gives the figures).
"""

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.model import StackedBatchNorm, StackedLayerNorm, StackedLinear

aten = torch.ops.aten


def autograd_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of seed * (summed cross-entropy of model(images) [K, B, C]) by autograd: the
    seed as a factor of the loss has the bits of seeding the backward pass, and given as
    grad_outputs it would import sympy, 0.32 s here."""
    loss = F.cross_entropy(model(images).flatten(0, 1), labels, reduction="sum")
    return torch.autograd.grad(loss * seed, tuple(model.parameters()))


class Linear:
    """x [K, B, in] @ W [K, in, out] (+ b [K, 1, out]), per replica."""

    def __init__(self, layer: StackedLinear, batch: int, first: bool) -> None:
        self.weight = layer.weight.detach()
        self.weight_t = self.weight.transpose(1, 2)
        self.bias = None if layer.bias is None else layer.bias.detach()
        replicas, fan_in, fan_out = self.weight.shape
        self.out = self.weight.new_empty(replicas, batch, fan_out)
        self.grads = [torch.empty_like(p) for p in (self.weight, self.bias) if p is not None]
        self.grad_in = None if first else self.weight.new_empty(replicas, batch, fan_in)  # the images need none
        self.x = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x:  # a new input (a buffer, as the images or an in-place activation, stays)
            self.x, self.x_t = x, x.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, self.weight, out=self.out)
        return torch.baddbmm(self.bias, x, self.weight, out=self.out)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        torch.bmm(self.x_t, grad, out=self.grads[0])
        if self.bias is not None:
            torch.sum(grad, 1, keepdim=True, out=self.grads[1])
        grad_in = None if self.grad_in is None else torch.bmm(grad, self.weight_t, out=self.grad_in)
        return grad_in, self.grads


class BatchNorm:
    """StackedBatchNorm's one `batch_norm` over K*F channels, and that kernel's backward. On the CPU
    `F.batch_norm` runs `native_batch_norm`, called here directly (18 against 26 us a layer, forward
    and backward, through the dispatching call); elsewhere it may pick cuDNN's, and the step calls
    `_batch_norm_impl_index`, which picks as it does, and the backward of its pick."""

    NATIVE = ("cpu",)  # the device types where F.batch_norm's kernel is native_batch_norm

    def __init__(self, layer: StackedBatchNorm, batch: int) -> None:
        replicas, _, features = layer.weight.shape
        self.stacked, self.channels = (replicas, batch, features), (batch, replicas * features)
        self.parameter = (replicas, 1, features)
        self.weight, self.bias = layer.weight.detach().view(-1), layer.bias.detach().view(-1)
        self.running = layer.running_mean.view(-1), layer.running_var.view(-1)
        self.momentum, self.eps = layer.momentum, layer.eps
        self.native = layer.weight.device.type in self.NATIVE

    def to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B, F] as [B, K * F]: a view for one replica, a copy for more (as the module's reshape)."""
        return x.view(self.channels) if self.stacked[0] == 1 else x.transpose(0, 1).reshape(self.channels)

    def from_channels(self, c: torch.Tensor) -> torch.Tensor:
        replicas, batch, features = self.stacked
        return c.view(self.stacked) if replicas == 1 else c.view(batch, replicas, features).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = self.to_channels(x)
        arguments = (self.x, self.weight, self.bias, *self.running, True, self.momentum, self.eps)
        if self.native:
            out, *self.saved = torch.native_batch_norm(*arguments)
        else:
            out, *self.saved, self.impl = torch._batch_norm_impl_index(*arguments, torch.backends.cudnn.enabled)
        return self.from_channels(out)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grad, mask = self.to_channels(grad), [True, True, True]
        if self.native:
            grads = aten.native_batch_norm_backward.default(
                grad, self.x, self.weight, *self.running, *self.saved, True, self.eps, mask)
        else:
            save_mean, save_var, reserve = self.saved
            grads = aten._batch_norm_impl_index_backward.default(
                self.impl, self.x, grad, self.weight, *self.running, save_mean, save_var, True, self.eps, mask, reserve)
        grad_in, grad_weight, grad_bias = grads
        return self.from_channels(grad_in), [grad_weight.view(self.parameter), grad_bias.view(self.parameter)]


class LayerNorm:
    def __init__(self, layer: StackedLayerNorm) -> None:
        self.weight, self.bias, self.eps = layer.weight.detach(), layer.bias.detach(), layer.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        self.normed, self.mean, self.rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, self.eps)
        return torch.addcmul(self.bias, self.normed, self.weight)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grad_in, _, _ = aten.native_layer_norm_backward.default(
            grad * self.weight, self.x, self.x.shape[-1:], self.mean, self.rstd, None, None, [True, False, False])
        return grad_in, [(grad * self.normed).sum(1, keepdim=True), grad.sum(1, keepdim=True)]


class Activation:
    """relu, tanh or sigmoid in place, their backward reading the output; gelu (nn.GELU's
    default, the exact erf form) reading its input."""

    KERNELS = {nn.ReLU: (torch.relu_, lambda grad, y: aten.threshold_backward.default(grad, y, 0)),
               nn.Tanh: (torch.tanh_, aten.tanh_backward.default),
               nn.Sigmoid: (torch.sigmoid_, aten.sigmoid_backward.default),
               nn.GELU: (F.gelu, aten.gelu_backward.default)}

    def __init__(self, layer: nn.Module) -> None:
        self.forward_kernel, self.backward_kernel = self.KERNELS[type(layer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.saved = x  # an in-place kernel's output, gelu's input
        return self.forward_kernel(x)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.backward_kernel(grad, self.saved), []


def _by_hand(layer: nn.Module, batch: int, first: bool):
    if isinstance(layer, StackedLinear):
        return Linear(layer, batch, first)
    if isinstance(layer, StackedBatchNorm):
        return BatchNorm(layer, batch)
    return LayerNorm(layer) if isinstance(layer, StackedLayerNorm) else Activation(layer)


@functools.cache
def classes_first_agrees(device_type: str, rows: int, classes: int) -> bool:
    """Whether log-softmax and its backward over logits [rows, classes] laid out classes first
    ([classes, rows], dim 0) give the bits of the usual layout's kernels (the last dim) here,
    compared on 64 random problems of the shape. The classes-first kernels go down each column
    class by class, vectorized across the rows (a scalar exp for a last few rows short of a
    vector); the last-dim ones sum a row's classes in that order only while they fit in one
    vector register (fewer than 16 floats with AVX-512, 8 with AVX2), in a tree otherwise."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, rows, classes, generator=generator) * 8).to(device_type)
    grad = torch.randn(64, rows, classes, generator=generator).to(device_type)
    by_rows = torch._log_softmax(logits, 2, False)
    first = torch._log_softmax(logits.transpose(1, 2).contiguous(), 1, False)
    back = torch._log_softmax_backward_data(grad, by_rows, 2, by_rows.dtype)
    first_back = torch._log_softmax_backward_data(grad.transpose(1, 2).contiguous(), first, 1, first.dtype)
    return torch.equal(by_rows, first.transpose(1, 2)) and torch.equal(back, first_back.transpose(1, 2))


class Backprop:
    """The gradients of one step on a split's rows, for a stack whose replicas each take `batch`,
    written into buffers made once for that shape (the train split's partial last batch gets its own)."""

    def __init__(self, layers: nn.Sequential, replicas: int, batch: int, pixels: torch.Tensor,
                 labels: torch.Tensor) -> None:
        self.layers = [_by_hand(layer, batch, first=depth == 0) for depth, layer in enumerate(layers)]
        self.split_pixels = pixels
        self.pixels = pixels.new_empty(replicas * batch, pixels.shape[1])
        self.images = torch.empty(replicas * batch, pixels.shape[1], device=pixels.device)
        self.stacked_images = self.images.view(replicas, batch, -1)
        self.logits = self.layers[-1].out.flatten(0, 1)  # [K * B, C]: the output Linear's buffer
        rows, classes = self.logits.shape
        # The log-softmax and its backward laid out classes first ([C, K * B], over dim 0), where
        # `classes_first_agrees` (the same bits): the last-dim kernels spend ~0.17 us a row on 10
        # classes, the classes-first ones vectorize across the rows. At K=20, 169 -> 50 us with the
        # two layout copies; the step 0.95x at K=20, 0.94x at K=5, K=1 within noise (AMD EPYC with
        # AVX-512, one thread, medians of 5 alternations in one process).
        self.classes_first = classes_first_agrees(pixels.device.type, rows, classes)
        # d(sum of -log p[label]) / d(log p) of every row of the split, seeded with 1 / B: -1/B at
        # the row's label, as nll_loss's backward writes it. A step gathers its rows' in one call,
        # where gathering the labels, zeroing and scattering took three: the same bits, 0.292 ->
        # 0.275 ms a K=1 batch-norm step, 0.192 -> 0.187 ms without (AMD EPYC, one thread).
        minus_seed = -torch.ones((), device=pixels.device).div(batch).expand(len(labels), 1)
        grad_log_p_of_row = torch.zeros(len(labels), classes, device=pixels.device).scatter_(
            1, labels.unsqueeze(1), minus_seed)
        self.grad_logits = torch.empty_like(self.logits)
        if self.classes_first:
            self.grad_log_p_of_row = grad_log_p_of_row.t().contiguous()
            self.scores, self.grad_scores = self.logits.new_empty(classes, rows), self.logits.new_empty(classes, rows)
        else:  # the scores are the logits themselves
            self.grad_log_p_of_row, self.scores, self.grad_scores = grad_log_p_of_row, self.logits, self.grad_logits
        self.grad_log_p = torch.empty_like(self.scores)
        self.stacked_grad_logits = self.grad_logits.view_as(self.layers[-1].out)

    def gradients(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every parameter's gradient, in `model.parameters()` order, for the rows [K * B]."""
        torch.index_select(self.split_pixels, 0, rows, out=self.pixels)
        self.images.copy_(self.pixels).div_(255)  # pipeline.data.as_images
        x = self.stacked_images
        for layer in self.layers:
            x = layer.forward(x)
        # d(loss / B)/d(logits): log-softmax's backward of the rows' seeds, over the scores' classes dim
        dim = 0 if self.classes_first else 1
        if self.classes_first:
            self.scores.copy_(self.logits.t())
        log_p = torch._log_softmax(self.scores, dim, False)
        torch.index_select(self.grad_log_p_of_row, 1 - dim, rows, out=self.grad_log_p)
        torch._log_softmax_backward_data(self.grad_log_p, log_p, dim, log_p.dtype, out=self.grad_scores)
        if self.classes_first:
            self.grad_logits.copy_(self.grad_scores.t())
        grad, grads = self.stacked_grad_logits, []
        for layer in reversed(self.layers):
            grad, own = layer.backward(grad)
            grads = own + grads
        return grads


def differs_from_autograd(device: torch.device) -> str | None:
    """How `Backprop` departs from autograd on a few-unit stack with each layer type once (6
    inputs, 3 classes), or None where it gives the same bits: every gradient, the running statistics."""
    generator = torch.Generator().manual_seed(0)
    replicas, batch = 2, 4
    pixels = torch.randint(0, 256, (12, 6), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, 3, (12,), generator=generator).to(device)
    rows = torch.randperm(12, generator=generator)[: replicas * batch].to(device)

    def linear(fan_in: int, fan_out: int, bias: bool) -> StackedLinear:
        layer = StackedLinear(torch.randn(replicas, fan_in, fan_out, generator=generator), bias)
        if bias:
            layer.bias.data.normal_(generator=generator)
        return layer

    by_hand = nn.Sequential(
        linear(6, 5, True), StackedBatchNorm(replicas, 5, 0.1, 1e-3), nn.ReLU(), linear(5, 4, False),
        StackedLayerNorm(replicas, 4, 1e-3), nn.Tanh(), linear(4, 4, True), nn.Sigmoid(), linear(4, 4, True),
        nn.GELU(), linear(4, 3, True)).to(device)
    by_autograd = copy.deepcopy(by_hand)
    images = (pixels.index_select(0, rows).float() / 255).view(replicas, batch, -1)
    seed = torch.ones((), device=device) / batch
    expected = autograd_gradients(by_autograd, images, labels.index_select(0, rows), seed)
    got = Backprop(by_hand, replicas, batch, pixels, labels).gradients(rows)
    if len(got) != len(expected) or not all(map(torch.equal, got, expected)):
        return "the hand-derived backward differs from autograd's"
    if not all(map(torch.equal, by_hand.buffers(), by_autograd.buffers())):
        return "the hand-derived batch norm's running statistics differ from autograd's"
    return None
