"""torch's private fast calls of a training step, each behind the public call it shortcuts.

At batch 32 a step costs well under a millisecond, so per-step Python overhead is what counts
(benchmarks/README.md). Two private calls skip it:
  gradients  the autograd engine's `run_backward`, where `torch.autograd.grad` ends after its
             argument checks (whose first seeded use imports sympy, 0.32 s here);
  update     `torch._fused_adam_` / `_fused_adamw_` / `_fused_sgd_`, where the functional
             `torch.optim.adam.adam` / `adamw.adamw` / `sgd.sgd` (fused=True) end after
             grouping tensors by device and dtype. Those functions are what
             `torch.optim.<Adam|AdamW|SGD>(fused=True).step()` calls; the classes themselves
             would import `torch._dynamo` in every train stage (1.3-1.5 s measured here).
Both paths run the same kernels with the same arguments: the same bits (tests/test_optimizer.py,
tests/test_fastpath.py), so the path taken changes no output. The private one saves 65-90 us a
step on this 2-core machine: 2,162 against 1,895 steps/s for one seed, 1,179 against 1,064 for
the lab's stack of 5 (medians of 3 x 2,000 steps, `python benchmarks/bench_step.py --parts fastpath`).

A torch release may rename or change a private call: `private_path()` decides once per
process, at the first optimizer, and takes the private calls only where they exist and give
the public result bit for bit on a few-element tensor; otherwise the public ones, with one
line on stderr. PIPELINE_FASTPATH=0 takes the public path outright (benchmarks, tests).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

BETAS = (0.9, 0.999)  # torch.optim's Adam defaults, as the lab's


def gradients(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: torch.Tensor,
              private: bool) -> tuple[torch.Tensor, ...]:
    """d(seed * loss)/d(inputs), as `torch.autograd.grad(loss, inputs, seed)` returns them."""
    if private:
        engine = torch.autograd.Variable._execution_engine
        return engine.run_backward((loss,), (seed,), False, False, inputs, False, False)
    return torch.autograd.grad(loss, inputs, seed)


@torch.no_grad()
def update(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
           exp_avg_sq: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, weight_decay: float,
           eps: float, private: bool) -> None:
    """One step of `kind` in place, as `torch.optim.<Adam|AdamW|SGD>(fused=True).step()` takes it.

    `steps` holds one float32 count per parameter, as torch.optim keeps them (SGD uses none).
    """
    if kind == "sgd":
        options = dict(weight_decay=weight_decay, momentum=0.0, lr=lr, dampening=0.0, nesterov=False,
                       maximize=False)
        if private:
            torch._fused_sgd_(params, grads, [], is_first_step=False, **options)
        else:
            sgd(params, grads, [None] * len(params), fused=True, **options)
        return
    options = dict(lr=lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                   maximize=False)
    if private:
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adam_ if kind == "adam" else torch._fused_adamw_
        kernel(params, grads, exp_avg, exp_avg_sq, [], steps, **options)
    else:
        (adam if kind == "adam" else adamw)(params, grads, exp_avg, exp_avg_sq, [], steps, fused=True, **options)


def _tiny_problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)


def _gradients_both_ways() -> tuple[tuple[torch.Tensor, ...], ...]:
    """The private call's gradients of a few-element loss, and torch.autograd.grad's.

    The public side takes the seed as a factor of the loss (its gradient is then seed * 1.0, the
    same bits): given as grad_outputs it would import sympy, 0.32 s of every train stage here."""
    weight, x = _tiny_problem()
    weight.requires_grad_(True)
    seed = torch.tensor(1 / 3)

    def loss() -> torch.Tensor:
        return (weight * x).tanh().square().sum()

    return gradients(loss(), (weight,), seed, private=True), torch.autograd.grad(loss() * seed, (weight,))


def _updated(kind: str, private: bool) -> list[torch.Tensor]:
    """Every tensor of a few-element optimizer after two steps with weight decay."""
    param, grad = _tiny_problem()
    exp_avg, exp_avg_sq, step = torch.zeros_like(param), torch.zeros_like(param), torch.zeros(())
    for _ in range(2):
        update(kind, [param], [grad], [exp_avg], [exp_avg_sq], [step], lr=0.01, weight_decay=0.1, eps=1e-8,
               private=private)
    return [param, exp_avg, exp_avg_sq, step]


def private_calls_fail() -> str | None:
    """Why the private calls cannot stand in for the public ones, or None where they can (~1 ms)."""
    try:
        via_engine, via_grad = _gradients_both_ways()
        if not all(map(torch.equal, via_engine, via_grad)):
            return "run_backward differs from torch.autograd.grad"
        for kind in ("adam", "adamw", "sgd"):
            if not all(map(torch.equal, _updated(kind, True), _updated(kind, False))):
                return f"the fused {kind} kernel differs from torch.optim's"
    except Exception as error:  # a private call renamed, removed or re-signed
        return f"{type(error).__name__}: {error}"
    return None


@functools.cache
def private_path() -> bool:
    """Whether this process takes torch's private calls (decided on the first call)."""
    if os.environ.get("PIPELINE_FASTPATH") == "0":
        return False
    reason = private_calls_fail()
    if reason is not None:
        print(f"pipeline: torch's public training calls in use, the private ones failed a self-check ({reason})",
              file=sys.stderr)
    return reason is None
