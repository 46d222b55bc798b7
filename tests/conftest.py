"""Shared test setup."""

import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before Triton is
# first imported; set here, before any test module is imported, the choice no longer depends on which
# module pytest imports first. (On a GPU machine nothing is set: the kernels compile.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The tests use tiny tensors; on a shared 2-core CI machine OpenMP barriers between two threads
    # make such operations 5-20x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_torch_compile_caches():
    # Eager FlexAttention (the CPU path of the flex backend and of the split backend's "flex" primitive)
    # runs through torch.compile, whose guard cache lives as long as the process. In torch 2.13,
    # explaining a recompile can raise instead of recompiling: when a cached entry's only failing
    # guard is its no-tensor-aliasing check (compiled for distinct q, k, v and made shape-dynamic by a
    # second length; now called with q is k is v), Dynamo re-evaluates that entry's tensor sources,
    # e.g. L['args'][3].__closure__[0].cell_contents.__closure__[1], on the new call's score_mod,
    # whose closures differ: "AttributeError: 'int' object has no attribute '__closure__'"
    # (pytorch/pytorch#176211; fix in PR #184793). Whether that happens depends on every earlier
    # flex call in the process, so each test starts from empty compile caches (nothing to reset,
    # and no import of torch._dynamo, where nothing was compiled).
    if "torch._dynamo" in sys.modules:
        torch.compiler.reset()
    yield
