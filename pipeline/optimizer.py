"""Adam, AdamW and SGD for a replica stack, calling torch's fused kernels directly.

`torch.optim` wraps the same kernels in ~60 us of Python per step (hooks, grouping tensors
by device and dtype, bookkeeping), a tenth of a stack's step at batch 32, and its first use
imports `torch._dynamo`, ~1 s of every train stage. Same kernels with the same arguments
give the same bits as `torch.optim.<Adam|AdamW|SGD>(fused=True)` (tests/test_optimizer.py).

Only element-wise updates: each replica's update reads its own slice alone, so one
optimizer over a stack of K is exactly K independent optimizers.
"""

from __future__ import annotations

import torch

from pipeline.params import VariantConfig

DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-2, "sgd": 0.0}  # torch.optim's defaults
BETAS = (0.9, 0.999)


class FusedOptimizer:
    """`step(grads)` updates `params` in place; `state_dict()` is what a checkpoint keeps."""

    def __init__(self, params: list[torch.Tensor], config: VariantConfig) -> None:
        self.params = tuple(params)
        self.kind, self.lr, self.eps = config.optimizer, config.lr, config.adam_eps
        wd = config.weight_decay
        self.weight_decay = DEFAULT_WEIGHT_DECAY[self.kind] if wd is None else wd
        self.step_count = torch.zeros((), device=params[0].device)  # Adam's t, float32 as torch.optim's fused path keeps it
        self.exp_avg = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.exp_avg_sq = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        if self.kind == "sgd":
            torch._fused_sgd_(self.params, list(grads), [], weight_decay=self.weight_decay, momentum=0.0,
                              lr=self.lr, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
            return
        self.step_count.add_(1)
        kernel = torch._fused_adam_ if self.kind == "adam" else torch._fused_adamw_
        kernel(self.params, list(grads), self.exp_avg, self.exp_avg_sq, [], [self.step_count] * len(self.params),
               lr=self.lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=self.weight_decay, eps=self.eps,
               amsgrad=False, maximize=False)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or len(state["exp_avg"]) != len(self.exp_avg):
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, not {self.kind!r}")
        self.step_count.copy_(state["step"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"], strict=True):
            mine.copy_(saved)
