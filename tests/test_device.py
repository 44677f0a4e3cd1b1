"""device.py: TensorFloat-32 products on for a while, and back as they were after."""

from __future__ import annotations

import pytest
import torch

from zforcing_cli.device import tensor_float32


@pytest.fixture
def tf32_off():
    """The setting off for the test, and as it was afterwards (monkeypatch cannot restore it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_tensor_float32_is_on_inside_and_restored_after_even_on_an_error(tf32_off):
    with tensor_float32(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(KeyboardInterrupt), tensor_float32(True):
        raise KeyboardInterrupt
    assert not torch.backends.cuda.matmul.allow_tf32


def test_tensor_float32_off_leaves_the_setting_alone(tf32_off):
    with tensor_float32(False):
        assert not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the user's own choice
    with tensor_float32(False):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32
