"""torch's private fast calls of a training step, each behind the public call it shortcuts.

The gradients come from pipeline/nn/backprop.py's step by hand, not from `torch.autograd.grad`'s
graph of nn.Module calls; the update from `torch._fused_adam_` / `_fused_adamw_` / `_fused_sgd_`,
where torch.optim's functional `adam` / `adamw` / `sgd` (fused=True) end after grouping tensors by
device and dtype. The same kernels on the same arguments: the path changes no output
(tests/test_backprop.py, test_optimizer.py, test_training.py). Against autograd's engine and the
same update, the step by hand takes 1.88x less CPU time at K=1 with batch norm (0.829 -> 0.442 ms)
and without (0.681 -> 0.363 ms), 1.33x at the lab's K=5 (1.467 -> 1.101 ms), where the first
layer's two 784-wide products and Adam are most of what is left: medians of 3 alternating runs of
1,000 steps on a shared 2-core machine (`python -m benchmarks.bench_step --parts fastpath`).

A torch release may rename or change a private call: `private_path(device)` decides once per
process and device type, at the first optimizer, taking the private calls only where they exist
and give the public result bit for bit on a few-element problem (every layer type, every
optimizer); otherwise the public ones, with one line on stderr. PIPELINE_FASTPATH=0 takes the
public path outright (benchmarks, tests).
"""

import functools
import os
import sys

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from pipeline.nn import backprop

BETAS = (0.9, 0.999)  # torch.optim's Adam defaults, as the lab's


@torch.no_grad()
def update(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
           exp_avg_sq: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, weight_decay: float,
           eps: float, private: bool, counts: torch.Tensor) -> None:
    """One step of `kind` in place, as `torch.optim.<Adam|AdamW|SGD>(fused=True).step()` takes it.
    `steps` are the views of `counts`, a float32 count per parameter as torch.optim keeps them (SGD
    uses none): the private path adds 1 to `counts` in one call (4 us), not one per parameter (25 us
    for 8 parameters with `_foreach_add_` on the CPU)."""
    if kind == "sgd":
        options = dict(weight_decay=weight_decay, momentum=0.0, lr=lr, dampening=0.0, nesterov=False, maximize=False)
        if private:
            torch._fused_sgd_(params, grads, [], is_first_step=False, **options)
        else:
            sgd(params, grads, [None] * len(params), fused=True, **options)
        return
    options = dict(lr=lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                   maximize=False)
    if private:
        counts.add_(1)
        kernel = torch._fused_adam_ if kind == "adam" else torch._fused_adamw_
        kernel(params, grads, exp_avg, exp_avg_sq, [], steps, **options)
    else:
        (adam if kind == "adam" else adamw)(params, grads, exp_avg, exp_avg_sq, [], steps, fused=True, **options)


def _updated(kind: str, private: bool, device: torch.device) -> list[torch.Tensor]:
    """Every tensor of a few-element optimizer after two steps with weight decay."""
    generator = torch.Generator().manual_seed(0)
    param, grad = (torch.randn(2, 3, generator=generator).to(device) for _ in range(2))
    exp_avg, exp_avg_sq, counts = torch.zeros_like(param), torch.zeros_like(param), torch.zeros(1, device=device)
    for _ in range(2):
        update(kind, [param], [grad], [exp_avg], [exp_avg_sq], list(counts.unbind()), lr=0.01, weight_decay=0.1,
               eps=1e-8, private=private, counts=counts)
    return [param, exp_avg, exp_avg_sq, counts]


def private_calls_fail(device: torch.device) -> str | None:
    """Why the private calls cannot stand in for the public ones on `device`, or None."""
    try:
        reason = backprop.differs_from_autograd(device)
        if reason is not None:
            return reason
        for kind in ("adam", "adamw", "sgd"):
            if not all(map(torch.equal, _updated(kind, True, device), _updated(kind, False, device))):
                return f"the fused {kind} kernel differs from torch.optim's"
    except Exception as error:  # a private call renamed, removed or re-signed
        return f"{type(error).__name__}: {error}"
    return None


def private_path(device: torch.device | str = "cpu") -> bool:
    """Whether this process takes the private calls on `device` (decided at its first call)."""
    return _private_path(torch.device(device).type)


@functools.cache
def _private_path(device_type: str) -> bool:
    if os.environ.get("PIPELINE_FASTPATH") == "0":
        return False
    reason = private_calls_fail(torch.device(device_type))
    if reason is not None:
        print(f"pipeline: torch's public training calls in use, the private ones failed a self-check ({reason})",
              file=sys.stderr)
    return reason is None
