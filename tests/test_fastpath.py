"""torch's private calls and their public fallbacks give the same bits; the choice between them.
(The hand-derived backward's own checks are tests/test_backprop.py.)"""

import pytest
import torch
from torch import nn

from pipeline.nn import backprop, fastpath


@pytest.fixture
def fresh_choice():
    fastpath._private_path.cache_clear()
    yield
    fastpath._private_path.cache_clear()


def test_private_calls_pass_their_self_check_on_this_torch(fresh_choice, monkeypatch, capsys):
    monkeypatch.delenv("PIPELINE_FASTPATH", raising=False)
    assert fastpath.private_calls_fail(torch.device("cpu")) is None
    assert fastpath.private_path(torch.device("cpu")) is True
    assert capsys.readouterr().err == ""


def test_environment_variable_forces_the_public_path(fresh_choice, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_FASTPATH", "0")
    assert fastpath.private_path() is False
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("breakage", "reason"), [
    ("removed", "AttributeError: module 'torch' has no attribute '_fused_adamw_'"),
    ("changed", "the fused adam kernel differs from torch.optim's"),
    ("backward", "the hand-derived backward differs from autograd's"),
])
def test_a_broken_private_call_falls_back_with_one_line(fresh_choice, monkeypatch, capsys, breakage, reason):
    monkeypatch.delenv("PIPELINE_FASTPATH", raising=False)
    if breakage == "removed":
        monkeypatch.delattr(torch, "_fused_adamw_")
    elif breakage == "changed":  # still runs, other bits (the kernels are shared, so the outcome is what is faked)
        monkeypatch.setattr(fastpath, "_updated", lambda kind, private, device: [torch.tensor(float(private))])
    else:  # a backward kernel that no longer masks: the step by hand is no longer autograd's
        monkeypatch.setitem(backprop.Activation.KERNELS, nn.ReLU, (torch.relu_, lambda grad, y: grad))
    assert fastpath.private_path() is False
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f"failed a self-check ({reason})")
