"""LSH-native training through the Triton kernels (the GPU path), run by Triton's interpreter on the CPU:
one training step of the LM with backend "triton" gives the loss and gradients of the torch "fused"
backend, with the step's fresh partitions, the model's non-contiguous q/k/v views and its output grads.

TRITON_INTERPRET must be set before the kernels are decorated (see test_triton_interpret.py)."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

for name in ("jit", "forward", "backward", "launch", ""):  # (re)imported so that their kernels are interpreted
    name = "poslsh.attention.triton" + (f".{name}" if name else "")
    importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)

from poslsh_lab.lm.model import ALiBiLM, LMConfig  # noqa: E402


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_training_step_through_triton_matches_the_torch_backend(scheme):
    torch.manual_seed(0)
    model = ALiBiLM(LMConfig(d_model=32, n_layers=2, n_heads=2, train_attention="poslsh")).train()
    x = torch.randint(0, 259, (2, 41), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("triton", "fused"):
        model.set_attention("lsh", samples=3, scheme=scheme, backend=backend).set_partition_schedule(5, step=7)
        model.zero_grad()
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None})
    (loss_t, grads_t), (loss_f, grads_f) = results["triton"], results["fused"]
    assert torch.allclose(loss_t, loss_f, atol=1e-5)
    assert grads_t.keys() == grads_f.keys() and len(grads_t) == len(list(model.parameters()))
    for name in grads_f:
        scale = grads_f[name].abs().max()
        assert scale > 0 and (grads_t[name] - grads_f[name]).abs().max() <= 1e-4 * scale + 1e-7, name
