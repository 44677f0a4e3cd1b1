"""The Triton kernels of the recurrence (fused_gpu.py) against the Python loops and the autograd
reference: in Triton's interpreter on a CPU (TRITON_INTERPRET=1), and compiled on a GPU where
there is one (the `cuda` tests, which scripts/gpu_check.sh runs). Skipped without Triton.
"""

from __future__ import annotations

import pytest
import torch

from zforcing_cli import fused_gpu, recurrence

import test_fused_cpu as loops_tests
from test_recurrence import (  # noqa: F401  (collected here again, with the Triton kernels)
    test_fused_matches_autograd_reference,
    test_gradient_when_only_the_states_reach_the_loss,
)

pytest.importorskip("triton")

TRITON_LOOPS = (fused_gpu.triton_rollout, fused_gpu.triton_backpropagate)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def triton_loops(request, monkeypatch):
    """The recurrence's loops are the Triton kernels, in the interpreter unless a test runs
    them on a GPU (the `cuda` tests)."""
    if "cuda" not in request.node.name:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(recurrence, "loops_for", lambda *tensors: TRITON_LOOPS)


@pytest.mark.parametrize("sizes", [
    dict(),
    dict(batch=1, steps=1, size=1, mlp=1, latent=1),
    dict(batch=19, steps=4, size=19, mlp=33, latent=17),  # two programs, the second part padding; odd widths
], ids=["small", "ones", "two-programs"])
def test_triton_kernels_give_the_python_loops_buffers_and_gradients_in_float64(sizes):
    forward, cotangents = loops_tests.loop_inputs(**sizes)
    python_buffers, python_grads = loops_tests.run(loops_tests.PYTHON_LOOPS, forward, cotangents)
    buffers, grads = loops_tests.run(TRITON_LOOPS, forward, cotangents)
    # (tanh is 2 sigmoid(2x) - 1 in the kernels: a few units of float64 rounding more than torch's)
    loops_tests.assert_all_close(buffers, python_buffers, rtol=1e-12, atol=1e-13)
    loops_tests.assert_all_close(grads, python_grads, rtol=1e-11, atol=1e-12)


def test_triton_kernels_in_float32_match_the_python_loops():
    forward, cotangents = loops_tests.loop_inputs(torch.float32, batch=4, steps=9, size=16, mlp=12, latent=4)
    python_buffers, python_grads = loops_tests.run(loops_tests.PYTHON_LOOPS, forward, cotangents)
    buffers, grads = loops_tests.run(TRITON_LOOPS, forward, cotangents)
    loops_tests.assert_all_close(buffers, python_buffers, rtol=1e-5, atol=1e-5)
    loops_tests.assert_all_close(grads, python_grads, rtol=1e-4, atol=1e-4)


def test_the_triton_kernels_are_taken_only_when_asked_for_on_a_gpu_in_float32(monkeypatch):
    weights = (torch.zeros(320, 64), torch.zeros(256, 16), torch.zeros(32, 64))
    on_gpu = torch.zeros(2, device="meta")  # is_cuda is False: stands for any other device
    monkeypatch.setenv(fused_gpu.SWITCH, "1")
    assert fused_gpu.loops(torch.zeros(2), *weights) is None  # a CPU
    assert fused_gpu.loops(on_gpu, *weights) is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert fused_gpu.loops(torch.zeros(2), *weights) == TRITON_LOOPS
    assert fused_gpu.loops(torch.zeros(2, dtype=torch.float64), *weights) is None
    wide = (torch.zeros(4 * 256 + 64, 256), torch.zeros(1024, 16), torch.zeros(32, 64))
    assert fused_gpu.loops(torch.zeros(2), *wide) is None  # wider than the kernels keep on chip
    monkeypatch.setenv(fused_gpu.SWITCH, "0")
    assert fused_gpu.loops(torch.zeros(2), *weights) is None  # off unless asked for


@cuda
def test_triton_kernels_on_cuda_match_the_python_loops_at_mnist_small_size(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    forward, cotangents = loops_tests.loop_inputs(torch.float32, batch=32, steps=50, size=64, mlp=64, latent=16)
    forward, cotangents = ([x.cuda() for x in group] for group in (forward, cotangents))
    python_buffers, python_grads = loops_tests.run(loops_tests.PYTHON_LOOPS, forward, cotangents)
    buffers, grads = loops_tests.run(TRITON_LOOPS, forward, cotangents)
    loops_tests.assert_all_close(buffers, python_buffers, rtol=1e-4, atol=1e-5)
    loops_tests.assert_all_close(grads, python_grads, rtol=1e-3, atol=1e-4)


@cuda
def test_a_training_update_on_cuda_takes_the_triton_kernels(monkeypatch):
    monkeypatch.setenv(fused_gpu.SWITCH, "1")
    monkeypatch.setattr(recurrence, "GRAPHS", recurrence.OrderedDict())
    model = loops_tests.reference.make_model("binary", dtype=torch.float32, scale=None).cuda()
    y, mask, noise = (x.cuda() for x in loops_tests.reference.make_batch("binary", 4, 9, model.config.latent_size, dtype=torch.float32))
    terms, grads = loops_tests.reference.loss_and_gradients(model, True, y, mask, noise)
    ref_terms, ref_grads = loops_tests.reference.loss_and_gradients(model, False, y, mask, noise)
    loops_tests.reference.assert_same(terms, ref_terms, rtol=1e-4, atol=1e-4)
    loops_tests.reference.assert_same(grads, ref_grads, rtol=1e-3, atol=1e-4)
    assert [key[0] for key in recurrence.GRAPHS] == ["triton_rollout", "triton_backpropagate"]
