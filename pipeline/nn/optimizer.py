"""Adam, AdamW and SGD for a replica stack, run through pipeline/nn/fastpath.py's update.

No `torch.optim.Optimizer` object: its first construction imports `torch._dynamo` (1.3-1.5 s of every
train stage, measured here) and its `step` wraps the fused kernels in per-step Python (hooks,
bookkeeping). The update, torch.optim's fused one, is element-wise: each replica's update reads its own
slice alone, so one optimizer over a stack of K is exactly K independent optimizers.
"""

import torch

from pipeline.nn import fastpath
from pipeline.config.variant import VariantConfig

DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-2, "sgd": 0.0}  # torch.optim's defaults


class FusedOptimizer:
    """`step(grads)` updates `params` in place; `state_dict()` is what a checkpoint keeps, the same
    on fastpath's private calls and its public ones (`private`; default: `fastpath.private_path`),
    so a checkpoint written on one path resumes on the other."""

    def __init__(self, params: list[torch.Tensor], config: VariantConfig, private: bool | None = None) -> None:
        self.params = list(params)
        self.private = fastpath.private_path(params[0].device) if private is None else private
        self.kind, self.lr, self.eps = config.optimizer, config.lr, config.adam_eps
        self.weight_decay = DEFAULT_WEIGHT_DECAY[self.kind] if config.weight_decay is None else config.weight_decay
        self.counts = torch.zeros(len(params), device=params[0].device)  # Adam's t per parameter (fastpath.update)
        self.steps = list(self.counts.unbind())
        self.exp_avg = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.exp_avg_sq = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []

    def step(self, grads: list[torch.Tensor]) -> None:
        fastpath.update(self.kind, self.params, list(grads), self.exp_avg, self.exp_avg_sq, self.steps, lr=self.lr,
                        weight_decay=self.weight_decay, eps=self.eps, private=self.private, counts=self.counts)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.steps[0], "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or len(state["exp_avg"]) != len(self.exp_avg):
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, not {self.kind!r}")
        self.counts.copy_(state["step"])  # every parameter's count, through the views in `steps`
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"], strict=True):
            mine.copy_(saved)
