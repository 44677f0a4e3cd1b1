"""The hand-written backpropagation through time (recurrence.py's Python loops) against autograd.

`ZForcing.autograd_rollout` runs the same loop in plain autograd operations: the reference. The
fused recurrence must give the same values and the same gradient for every parameter, for the
three output types, with padding masks and with the auxiliary head on [h_{t-1}, z_t].
"""

from __future__ import annotations

import pytest
import torch

from zforcing_cli.device import tensor_float32
from zforcing_cli.model import ZForcing, ZForcingConfig
from zforcing_cli import recurrence, steps
from zforcing_cli.recurrence import PosteriorRecurrence, StepProduct, onednn_ready, posterior_recurrence

INPUT_SIZES = {"binary": 2, "tokens": 9, "frames": 4}


@pytest.fixture(autouse=True)
def python_loops(monkeypatch):
    """This file holds recurrence.py's Python loops to the reference (a GPU runs them); the
    compiled CPU loops, which the model takes by default where they build, have their own
    tests in test_fused_cpu.py (which runs these with them)."""
    monkeypatch.setenv("ZFORCING_COMPILED_LOOPS", "0")


def make_model(modality: str, dtype=torch.float64, scale: float | None = 0.6, **sizes) -> ZForcing:
    """A model whose weights are redrawn from N(0, scale²) (when scale is given) so that the
    clipped nonlinearity, the latent clamp and the gates work away from their linear regime."""
    torch.manual_seed(0)
    config = ZForcingConfig(modality=modality, input_size=INPUT_SIZES[modality], start_index=2,
                            **{"embed_size": 5, "hidden_size": 6, "latent_size": 3, "mlp_size": 7, "latent_clamp": 1.5, **sizes})
    model = ZForcing(config).to(dtype)
    if scale is not None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * scale)
    return model


def make_batch(modality: str, batch: int, steps: int, latent: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(2)
    if modality == "frames":
        y = torch.randn(batch, steps, INPUT_SIZES[modality], generator=generator, dtype=dtype)
    else:
        y = torch.randint(0, INPUT_SIZES[modality], (batch, steps), generator=generator)
        y = y.to(dtype) if modality == "binary" else y
    lengths = torch.tensor([steps] + [max(1, steps - 2 - 3 * row) for row in range(1, batch)])
    mask = (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    noise = 2.0 * torch.randn(batch, steps, latent, generator=generator, dtype=dtype)  # reaches the clamps
    return y, mask, noise


def loss_and_gradients(model: ZForcing, fused: bool, y, mask, noise) -> tuple[dict, dict]:
    """Every term of the objective, and the gradient of a mix of all of them for every parameter."""
    model.fused_recurrence = fused
    model.zero_grad()
    out = model(y, mask, noise=noise)
    terms = {name: getattr(out, name).detach() for name in ("nll", "kl", "aux", "bwd", "log_q_minus_log_p")}
    (out.nll + out.kl + 0.3 * out.aux + 0.2 * out.bwd + 0.1 * out.log_q_minus_log_p).sum().backward()
    return terms, {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def assert_same(fused: dict, reference: dict, rtol: float, atol: float) -> None:
    assert fused.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("aux_on_hidden", [False, True], ids=["aux-z", "aux-hz"])
@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_fused_matches_autograd_reference(modality, aux_on_hidden):
    model = make_model(modality, aux_on_hidden=aux_on_hidden)
    y, mask, noise = make_batch(modality, 4, 9, model.config.latent_size)
    terms, grads = loss_and_gradients(model, True, y, mask, noise)
    ref_terms, ref_grads = loss_and_gradients(model, False, y, mask, noise)
    assert_same(terms, ref_terms, rtol=1e-12, atol=1e-12)
    assert_same(grads, ref_grads, rtol=1e-10, atol=1e-12)
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if not name.startswith("embedding")), "every weight gets a gradient"


@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_fused_matches_reference_in_float32_where_onednn_multiplies(modality):
    # 256 units make the stacked recurrent weight large enough for oneDNN's products on CPU.
    model = make_model(modality, dtype=torch.float32, scale=None, embed_size=16, hidden_size=256, latent_size=16, mlp_size=256)
    from_h_weight = torch.cat([model.forward_cell.hidden_to_gates.weight, model.posterior.hidden.weight[:, :256]])
    assert StepProduct(from_h_weight.detach(), 4).packed is not None or not onednn_ready(from_h_weight)
    y, mask, noise = make_batch(modality, 4, 7, 16, dtype=torch.float32)
    terms, grads = loss_and_gradients(model, True, y, mask, noise)
    ref_terms, ref_grads = loss_and_gradients(model, False, y, mask, noise)
    assert_same(terms, ref_terms, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


def test_every_step_product_through_onednn_matches_the_float64_reference():
    # Sizes where all three per-step weights (h, z and the posterior's square output layer) are
    # large enough for oneDNN in float32, against the autograd loop in float64 (MKL products).
    batch, steps, size, mlp, latent, clamp = 4, 5, 256, 512, 256, 2.0
    model = make_model("frames", scale=None, hidden_size=size, mlp_size=mlp, latent_size=latent, latent_clamp=clamp)
    generator = torch.Generator().manual_seed(8)

    def draw(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    inputs = [draw(batch, steps, 4 * size), draw(batch, steps, mlp), draw(batch, steps, latent),
              draw(4 * size + mlp, size, scale=size**-0.5), draw(4 * size, latent, scale=latent**-0.5),
              model.posterior.out.weight.detach(), model.posterior.out.bias.detach()]
    assert all(onednn_ready(weight.float()) for weight in inputs[3:6]) or not onednn_ready(torch.zeros(1 << 18))
    cotangents = [draw(batch, steps + 1, size), draw(batch, steps, latent), draw(batch, steps, latent), draw(batch, steps, latent)]

    leaves32 = [x.float().requires_grad_() for x in inputs]
    states, z, mean, logvar, _ = posterior_recurrence(*leaves32, clamp=clamp)
    fused = [states, z, mean, logvar, *torch.autograd.grad((states, z, mean, logvar), leaves32, [c.float() for c in cotangents])]
    leaves64 = [x.clone().requires_grad_() for x in inputs[:5]]
    reference = list(model.autograd_rollout(*leaves64))[:4]
    weight, bias = model.posterior.out.weight, model.posterior.out.bias
    reference += torch.autograd.grad(reference, [*leaves64, weight, bias], cotangents)
    for index, (got, expected) in enumerate(zip(fused, reference)):
        tolerance = 1e-4 * max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=tolerance, msg=f"output or gradient {index}")


def test_onednn_products_only_where_torch_allows_them(monkeypatch):
    large, small = torch.randn(1024, 256), torch.randn(64, 64)
    assert not onednn_ready(small)
    assert not onednn_ready(large.double())
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not onednn_ready(large)
    assert StepProduct(large, 4).packed is None


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_steps_loop_on_one_thread_large_ones_share_the_threads(two_threads, monkeypatch):
    seen = []
    product = StepProduct.__call__
    monkeypatch.setattr(StepProduct, "__call__", lambda self, x, out: seen.append(torch.get_num_threads()) or product(self, x, out))
    inputs = [x.detach().float() for x in recurrence_inputs()]
    recurrence.rollout(recurrence.RolloutInputs(*inputs), 1.2)
    assert set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setattr(steps, "SERIAL_MAX_WORK", 0)  # every step counts as large
    recurrence.rollout(recurrence.RolloutInputs(*inputs), 1.2)
    assert set(seen) == {2}


def test_the_thread_count_comes_back_after_an_error_in_the_loop(two_threads):
    with pytest.raises(ZeroDivisionError):
        with steps.step_threads(torch.zeros(1, 1), rows=1):
            assert torch.get_num_threads() == 1
            1 / 0
    assert torch.get_num_threads() == 2


def recurrence_inputs(batch=3, steps=5, size=4, mlp=5, latent=2):
    generator = torch.Generator().manual_seed(3)

    def draw(*shape, scale=0.7):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    return (draw(batch, steps, 4 * size), draw(batch, steps, mlp), draw(batch, steps, latent, scale=1.5),
            draw(4 * size + mlp, size), draw(4 * size, latent), draw(2 * latent, mlp), draw(2 * latent))


def test_backward_passes_numerical_gradient_check():
    # Every input, the noise included, against finite differences; every output used (c_T too).
    inputs = recurrence_inputs()
    assert torch.autograd.gradcheck(lambda *x: PosteriorRecurrence.apply(*x, 1.2), inputs)


def test_gradient_when_only_the_states_reach_the_loss():
    # The other outputs' gradients are zeros that autograd fills in.
    inputs = recurrence_inputs()
    states, *_ = posterior_recurrence(*inputs, clamp=1.2)
    fused = torch.autograd.grad(states[:, 1:].pow(2).sum(), inputs)
    inputs_again = [x.detach().requires_grad_() for x in inputs]
    model = make_model("frames", hidden_size=4, mlp_size=5, latent_size=2, latent_clamp=1.2)
    with torch.no_grad():
        model.posterior.out.weight.copy_(inputs_again[5])
        model.posterior.out.bias.copy_(inputs_again[6])
    reference_states = model.autograd_rollout(*inputs_again[:5])[0]
    reference = torch.autograd.grad(reference_states[:, 1:].pow(2).sum(), inputs_again[:5])
    for got, expected in zip(fused[:5], reference):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_recurrence_stays_float32_under_autocast():
    model = make_model("frames", dtype=torch.float32, scale=None)
    y, mask, noise = make_batch("frames", 2, 5, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(y, mask, noise=noise)
        states = model.posterior_rollout(model.embed(y), model.backward_states(model.embed(y), mask.sum(1).long()), noise)[0]
    assert states.dtype == torch.float32
    assert torch.isfinite(out.elbo).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_cuda_graphs_match_the_reference_on_gpu(modality, monkeypatch):
    monkeypatch.setattr(recurrence, "GRAPHS", recurrence.OrderedDict())
    model = make_model(modality, dtype=torch.float64).cuda()
    y, mask, noise = (x.cuda() for x in make_batch(modality, 4, 9, model.config.latent_size))
    ref_terms, ref_grads = loss_and_gradients(model, False, y, mask, noise)
    for _ in range(2):  # captured at the first call, replayed at the second
        terms, grads = loss_and_gradients(model, True, y, mask, noise)
        assert_same(terms, ref_terms, rtol=1e-12, atol=1e-12)
        assert_same(grads, ref_grads, rtol=1e-10, atol=1e-12)
    assert [key[0] for key in recurrence.GRAPHS] == ["rollout", "backpropagate"]


@cuda
def test_cuda_graph_cache_is_bounded_and_outputs_are_copies(monkeypatch):
    monkeypatch.setattr(recurrence, "GRAPHS", recurrence.OrderedDict())
    monkeypatch.setattr(recurrence, "GRAPH_CACHE_SIZE", 2)
    model = make_model("frames", dtype=torch.float32, scale=None).cuda()

    def states_for(steps: int, noise_scale: float) -> torch.Tensor:
        y, mask, noise = (x.cuda() for x in make_batch("frames", 2, steps, 3, dtype=torch.float32))
        with torch.no_grad():
            backward = model.backward_states(model.embed(y), mask.sum(1).long())
            return model.posterior_rollout(model.embed(y), backward, noise_scale * noise)[0]

    kept = states_for(3, 1.0)
    snapshot = kept.clone()
    assert not torch.equal(states_for(3, 2.0), snapshot)  # a replay of the same graph
    torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)  # did not overwrite the first result
    for steps in (4, 5, 6):
        states_for(steps, 1.0)
        assert len(recurrence.GRAPHS) <= 2
    torch.testing.assert_close(states_for(3, 1.0), snapshot)  # captured afresh after eviction


@cuda
def test_cuda_graphs_are_captured_apart_with_and_without_tensor_float32(monkeypatch):
    """A graph replays the kernels chosen at its capture, so TF32 products get graphs of their own."""
    monkeypatch.setattr(recurrence, "GRAPHS", recurrence.OrderedDict())
    model = make_model("frames", dtype=torch.float32, scale=None).cuda()
    y, mask, noise = (x.cuda() for x in make_batch("frames", 2, 3, 3, dtype=torch.float32))

    def states() -> torch.Tensor:
        with torch.no_grad():
            backward = model.backward_states(model.embed(y), mask.sum(1).long())
            return model.posterior_rollout(model.embed(y), backward, noise)[0]

    with tensor_float32(False):
        exact = states()
    with tensor_float32(True):
        rounded = states()
    assert len(recurrence.GRAPHS) == 2 or torch.backends.cuda.matmul.allow_tf32  # (one graph if TF32 was on all along)
    torch.testing.assert_close(rounded, exact, rtol=1e-2, atol=1e-2)
