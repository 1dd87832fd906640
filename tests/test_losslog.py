"""LossLog: per-step losses copied to the host in batches (CUDA) or at once (CPU), NaN named by step."""

from __future__ import annotations

import pytest
import torch

from backend.pipeline.losslog import LossLog


def test_batches_on_cuda_and_names_the_first_bad_step():
    out: list[float] = []
    log = LossLog(out, torch.device("cuda"), "coarse", every=3)  # only the batching rule looks at the device
    log.add(0, torch.tensor(1.5))
    log.add(1, torch.tensor(2.5))
    assert out == [] and log.last is None  # nothing copied yet: no host sync for these steps
    log.add(2, torch.tensor(3.5))
    assert out == [1.5, 2.5, 3.5] and log.last == 3.5
    log.add(3, torch.tensor(4.0))
    log.add(4, torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="coarse stage: non-finite loss nan at step 4"):
        log.flush()


def test_cpu_copies_every_step():
    out: list[float] = []
    log = LossLog(out, "cpu", "fine", every=10)
    log.add(0, torch.tensor(0.25, requires_grad=True) * 2)
    assert out == [0.5]
    with pytest.raises(FloatingPointError, match="fine stage: non-finite loss inf at step 1"):
        log.add(1, torch.tensor(float("inf")))
