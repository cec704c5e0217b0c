"""precision.true_fp32: TF32 off inside and every setting back after, with legacy flags or the newer fp32_precision."""

from __future__ import annotations

import pytest
import torch

from dkuxnet.precision import true_fp32

B = torch.backends


def _read(get):
    try:
        return get()
    except RuntimeError:  # torch refuses legacy reads once the newer settings disagree
        return "raises"


def _state() -> dict[str, object]:
    return {
        "matmul.allow_tf32": _read(lambda: B.cuda.matmul.allow_tf32), "cudnn.allow_tf32": _read(lambda: B.cudnn.allow_tf32),
        "matmul.fp32_precision": B.cuda.matmul.fp32_precision, "conv.fp32_precision": B.cudnn.conv.fp32_precision,
        "cudnn.fp32_precision": B.cudnn.fp32_precision, "fp32_precision": B.fp32_precision,
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
    }


@pytest.fixture(autouse=True)
def _restore_backends():
    before = _state()
    yield
    B.fp32_precision, B.cudnn.fp32_precision = before["fp32_precision"], before["cudnn.fp32_precision"]
    B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32 = before["matmul.allow_tf32"], before["cudnn.allow_tf32"]
    torch.set_float32_matmul_precision(before["float32_matmul_precision"])
    B.cuda.matmul.fp32_precision, B.cudnn.conv.fp32_precision = before["matmul.fp32_precision"], before["conv.fp32_precision"]
    assert _state() == before


def _check(configure, legacy_readable: bool) -> None:
    configure()
    outside = _state()
    with true_fp32():
        assert B.cuda.matmul.fp32_precision == "ieee" and B.cudnn.conv.fp32_precision == "ieee"
        inside = _state()
        for flag in ("matmul.allow_tf32", "cudnn.allow_tf32"):
            assert inside[flag] is False if legacy_readable else inside[flag] in (False, "raises"), inside
    assert _state() == outside


def test_legacy_flags():
    def configure():
        B.cuda.matmul.allow_tf32 = True
        B.cudnn.allow_tf32 = True

    _check(configure, legacy_readable=True)
    assert B.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"


def test_newer_fp32_precision_settings():
    """After the newer setters the legacy getter raises; the old save-the-legacy-flags helper failed here."""
    def configure():
        B.cuda.matmul.fp32_precision = "tf32"
        B.cudnn.conv.fp32_precision = "tf32"

    configure()
    with pytest.raises(RuntimeError):
        B.cuda.matmul.allow_tf32  # noqa: B018 - the read that raises
    _check(configure, legacy_readable=False)
    assert B.cuda.matmul.fp32_precision == "tf32"


def test_generic_setting_and_matmul_precision():
    def configure():
        torch.set_float32_matmul_precision("medium")
        B.fp32_precision = "tf32"  # conv and matmul inherit it

    _check(configure, legacy_readable=False)
