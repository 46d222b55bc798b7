"""hf_graph's static-window step on the Triton kernels the GPU runs, through Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set before the kernels are imported, as tests/test_plan_triton.py does): the step, the
operator included, reads nothing on the host (what a CUDA graph needs), and its tokens are the patched
model's own."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("transformers")

from interpreted_triton import load_interpreted  # noqa: E402
from test_hf_graph import WINDOW, _generate, _HostRead, _model, _prompt  # noqa: E402

from poslsh.integrations.hf import patch_model  # noqa: E402
from poslsh.integrations.hf_graph import GraphedDecoder  # noqa: E402

load_interpreted()


@torch.no_grad()
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on fully masked key tiles
def test_triton_static_step_reads_nothing_on_the_host_and_equals_generate():
    """A 7-token prompt (front slots masked) decoded 14 steps (the window of 17 slots fills and slides),
    every attention call on the Triton kernels: the tokens of the patched model's generate; then one more
    step with the token and the cache standing for device tensors reads none of their values on the host."""
    model = _model("bloom")
    ids = _prompt(7)
    with patch_model(model, **WINDOW, evict=True, backend="triton") as patch:
        decoder = GraphedDecoder(model)
        static = decoder.generate(ids, 14, chunk_size=4)
        assert all(plan._tplan is not None for plan in patch.plans.values())  # the Triton path ran
        assert torch.equal(static, _generate(model, ids, 14)) and len(set(static[0, 7:].tolist())) > 3
        _HostRead.watch(decoder)
        decoder.step()
    assert type(decoder.token) is _HostRead
    assert [files[-3:] for files in _HostRead.sites] == []
