"""The CPU guard for the GPU paths (capture_guard.py): what CUDA-graph capture refuses never
reaches the recurrence's loops (which a GPU captures) nor a training update (which must never
make the host wait), for every modality and precision. CI has no GPU: without this, a host
copy in a loop breaks every GPU run and nothing here notices (scripts/gpu_check.sh is the
check on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zforcing_cli import recurrence
from zforcing_cli.data import open_dataset
from zforcing_cli.device import tensor_float32
from zforcing_cli.model import ZForcing, ZForcingConfig
from zforcing_cli.runconfig import RunConfig, TrainConfig, data_description
from zforcing_cli.train import Trainer
from zforcing_cli.update import SKIPPED, TrainingStep, onednn_off

from capture_guard import CaptureGuard, CaptureRefused

CPU = torch.device("cpu")

# -- the guard itself: each thing capture refuses is refused, and what it allows passes ----------------

x = torch.arange(6.0).view(2, 3)

REFUSED = {
    "new_tensor used in an operation": lambda: torch.mul(x, x.new_tensor(0.5), out=torch.empty_like(x)),
    "torch.tensor in an addition": lambda: x + torch.tensor([1.0, 2.0, 3.0]),
    "a view of a host tensor in use": lambda: x * torch.tensor([[1.0, 2.0, 3.0]]).expand(2, 3),
    "item": lambda: x.sum().item(),
    "bool": lambda: bool((x > 0).all()),
    "float": lambda: float(x.sum()),
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "cpu": lambda: x.cpu(),
    "nonzero": lambda: torch.nonzero(x),
    "boolean-mask indexing": lambda: x[x > 2],
    "boolean-mask assignment": lambda: x.clone().__setitem__(x > 2, 0.0),
    "masked_select": lambda: torch.masked_select(x, x > 2),
    "unique": lambda: torch.unique(x),
    "repeat_interleave by a tensor": lambda: torch.repeat_interleave(torch.arange(3), torch.arange(3)),
    "equal": lambda: torch.equal(x, x),
    "a generator of its own": lambda: torch.randn(3, generator=torch.Generator().manual_seed(0)),
}

ALLOWED = {
    "a number filled in": lambda: x.clone().__setitem__(0, 0.0),
    "new_full": lambda: torch.mul(x, x.new_full((), 0.5), out=torch.empty_like(x)),
    "a Python number": lambda: x * 0.5 + 1,
    "a fill from a host scalar": lambda: x.clone().fill_(torch.tensor(2.0)),
    "masked_fill with a number": lambda: x.masked_fill(x > 2, 0.0),
    "clamp and where": lambda: torch.where(x > 2, x, x.clamp(max=1.0)),
    "the default generator": lambda: torch.randn(3),
}


@pytest.mark.parametrize("name", REFUSED)
def test_capture_guard_refuses(name):
    with pytest.raises(CaptureRefused, match="CUDA-graph capture refuses"), CaptureGuard():
        REFUSED[name]()


@pytest.mark.parametrize("name", ALLOWED)
def test_capture_guard_allows(name):
    with CaptureGuard():
        ALLOWED[name]()


def test_capture_guard_ends_with_its_block():
    with CaptureGuard():
        pass
    assert x.sum().item() == 15.0 and x.new_tensor(0.5) * x is not None


# -- the recurrence's loops, as a GPU captures them ---------------------------------------------------

SIZES = dict(embed_size=5, hidden_size=6, latent_size=3, mlp_size=7)
INPUTS = {"binary": 2, "tokens": 9, "frames": 4}


def tiny_model(modality: str) -> ZForcing:
    torch.manual_seed(0)
    return ZForcing(ZForcingConfig(modality=modality, input_size=INPUTS[modality], start_index=2, **SIZES))


def tiny_batch(modality: str, batch: int = 3, steps: int = 7):
    generator = torch.Generator().manual_seed(1)
    if modality == "frames":
        y = torch.randn(batch, steps, INPUTS[modality], generator=generator)
    else:
        y = torch.randint(0, INPUTS[modality], (batch, steps), generator=generator)
    mask = torch.ones(batch, steps)
    mask[1:, -2:] = 0.0  # padding, as text batches have
    return y, mask


@pytest.fixture
def guarded_loops(monkeypatch) -> list[str]:
    """Every run of a loop (what LoopGraph captures on a GPU) under the guard; the names of the
    loops that ran. The Python loops, as on a GPU: the compiled CPU loops are one operator each."""
    monkeypatch.setenv("ZFORCING_COMPILED_LOOPS", "0")
    ran = []
    run_loop = recurrence.run_loop

    def guarded(loop, inputs, clamp):
        ran.append(loop.__name__)
        with CaptureGuard():
            return run_loop(loop, inputs, clamp)

    monkeypatch.setattr(recurrence, "run_loop", guarded)
    return ran


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_capture_guard_passes_both_loops(modality, precision, guarded_loops):
    model = tiny_model(modality)
    y, mask = tiny_batch(modality)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with tensor_float32(precision == "tf32"), autocast, onednn_off(dtype is not None):  # as TrainingStep does
        out = model(y, mask, generator=torch.Generator().manual_seed(2))
    (out.nll + out.kl + out.aux + out.bwd).float().mean().backward()
    assert guarded_loops == ["rollout", "backpropagate"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_capture_guard_catches_a_host_copy_in_a_loop(monkeypatch, guarded_loops):
    """The guard sees into the loops: a host tensor made there (the line that broke CUDA on
    main) is refused."""
    new_full = torch.Tensor.new_full

    def from_host(self, size, value, **kwargs):
        return self.new_tensor(value) if size == () else new_full(self, size, value, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_full", from_host)
    y, mask = tiny_batch("binary")
    with pytest.raises(CaptureRefused, match="host data"):
        tiny_model("binary")(y, mask)


# -- a whole training update, as a GPU takes it (metrics left on the device) ---------------------------


@pytest.fixture(scope="module")
def datasets(tiny_data, timit_data, text_data) -> dict:
    return {"binary": open_dataset(tiny_data), "frames": open_dataset(timit_data), "tokens": open_dataset(text_data)}


def device_trainer(dataset, run_dir, precision: str, latent: bool = True) -> Trainer:
    """A trainer that takes its updates as on a GPU: fused Adam skipping non-finite updates on
    the device, the KL weight annealed on the device, the metrics read later. fp16 and tf32 are
    GPU precisions: here fp16 is autocast with a CPU gradient scaler, tf32 the flag it sets.
    latent False: the network without z (--no-latent), trained on its NLL alone."""
    meta = dataset.meta
    model = ZForcingConfig(modality=meta.modality, input_size=meta.input_size, start_index=2 if meta.modality == "binary" else 1,
                           embed_dropout=0.2 if meta.modality == "tokens" else 0.0, latent=latent, **SIZES)
    weights = dict(aux_weight=1e-3, bwd_weight=1e-3, kl_anneal=True) if latent else dict(aux_weight=0.0, bwd_weight=0.0)
    train = TrainConfig(batch_size=4, log_every=5, precision="bf16" if precision == "bf16" else "fp32", **weights)
    trainer = Trainer(run_dir, RunConfig(model, train, data_description(dataset)), dataset, CPU, read_every=5)
    if precision == "fp16":
        trainer.updater.training_step = TrainingStep(trainer.model, train, torch.float16)
        trainer.updater.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    assert trainer.updater.on_device
    return trainer


@pytest.mark.parametrize("latent", [True, False], ids=["z", "no-latent"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_capture_guard_passes_a_training_update(datasets, modality, precision, latent, tmp_path):
    trainer = device_trainer(datasets[modality], tmp_path / "run", precision, latent)
    guard = CaptureGuard()
    make_inputs = trainer.step_inputs

    def made_on_the_host(indices):  # the batch, read from disk and sent to the device
        with guard.paused():
            return make_inputs(indices)

    trainer.step_inputs = made_on_the_host
    with tensor_float32(precision == "tf32"):
        trainer.take_step(np.arange(4))  # the first: Adam's state and the device counters are made
        with guard:
            trainer.take_step(np.arange(4, 8))
            trainer.take_step(np.arange(8, 12))
    records = torch.stack([update.record for update in trainer.pending.updates])  # the METRICS, then skipped
    assert trainer.state.step == 3 and records.shape[0] == 3
    assert torch.isfinite(records).all() and not records[:, SKIPPED].any()  # three updates taken


# -- the authors' forms (docs/protocols.md's departures) ----------------------------------------------

AUTHORS_MODEL = dict(output_head="linear", init="authors", lstm_biases="two", backward_layers=2, aux_cost="l2")


@pytest.mark.parametrize("options", [AUTHORS_MODEL, dict(cond_ln=True, backward_layers=2)], ids=["authors", "cond_ln"])
@pytest.mark.parametrize("modality", ["binary", "frames"])
def test_capture_guard_passes_the_authors_forms(modality, options, guarded_loops):
    """The options the loops run (heads, init, biases, depth, L2 aux) keep them capturable;
    cond_ln, which bypasses them for autograd_rollout, makes no host copy either, forward or backward."""
    torch.manual_seed(0)
    model = ZForcing(ZForcingConfig(modality=modality, input_size=INPUTS[modality], start_index=2, **SIZES, **options))
    y, mask = tiny_batch(modality)
    with CaptureGuard():
        out = model(y, mask)
        (out.nll + out.kl + out.aux + out.bwd).mean().backward()
    assert guarded_loops == ([] if options.get("cond_ln") else ["rollout", "backpropagate"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("modality", ["binary", "frames"])
def test_capture_guard_passes_a_training_update_under_the_authors_rules(datasets, modality, tmp_path):
    """cond_ln and the authors' training rules (skip on the loss only, a KL limit, the KL weight
    advancing on skips) in an update as a GPU takes it."""
    dataset = datasets[modality]
    meta = dataset.meta
    model = ZForcingConfig(modality=meta.modality, input_size=meta.input_size, start_index=2, cond_ln=True,
                           backward_first="data" if modality == "frames" else "skip", **SIZES)
    train = TrainConfig(batch_size=4, aux_weight=1e-3, bwd_weight=1e-3, kl_anneal=True, kl_anneal_on_skip="advance",
                        skip_rule="loss", skip_kl_above=1e4, log_every=5)
    trainer = Trainer(tmp_path / "run", RunConfig(model, train, data_description(dataset)), dataset, CPU, read_every=5)
    guard = CaptureGuard()
    make_inputs = trainer.step_inputs

    def made_on_the_host(indices):
        with guard.paused():
            return make_inputs(indices)

    trainer.step_inputs = made_on_the_host
    trainer.take_step(np.arange(4))
    with guard:
        trainer.take_step(np.arange(4, 8))
    records = torch.stack([update.record for update in trainer.pending.updates])
    assert torch.isfinite(records).all() and not records[:, SKIPPED].any()
