"""The mixed-precision policy is a pure function of (requested, device type, bf16 support)."""

import pytest
import torch

from iddpm.precision import PrecisionPolicy, autocast, choose_precision, make_scaler

# (requested, device, bf16 supported) -> (name, autocast dtype, scaler)
TABLE = [
    ("auto", "cuda", True, "bf16", torch.bfloat16, False),  # A100/H100: bf16, no scaler needed
    ("auto", "cuda", False, "fp16", torch.float16, True),  # T4/V100: fp16 needs loss scaling
    ("auto", "cpu", True, "fp32", None, False),
    ("auto", "cpu", False, "fp32", None, False),
    ("auto", "mps", False, "fp32", None, False),
    ("fp32", "cuda", True, "fp32", None, False),
    ("bf16", "cpu", True, "bf16", torch.bfloat16, False),
    ("fp16", "cuda", True, "fp16", torch.float16, True),
    ("bf16", "cuda", True, "bf16", torch.bfloat16, False),
]


@pytest.mark.parametrize(("requested", "device", "bf16", "name", "dtype", "scaler"), TABLE)
def test_policy_table(requested, device, bf16, name, dtype, scaler):
    assert choose_precision(requested, device, bf16) == PrecisionPolicy(name, dtype, scaler)


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "match"),
    [
        ("bf16", "cuda", False, "not supported"),
        ("fp16", "cpu", True, "needs a CUDA device"),
        ("bf16", "mps", True, "MPS"),
        ("half", "cuda", True, "unknown precision"),
        ("auto", "tpu", True, "unknown device type"),
    ],
)
def test_policy_refuses_what_the_device_cannot_run(requested, device, bf16, match):
    with pytest.raises(ValueError, match=match):
        choose_precision(requested, device, bf16)


def test_autocast_and_scaler_follow_the_policy():
    cpu = torch.device("cpu")
    fp32 = choose_precision("fp32", "cpu", True)
    assert make_scaler(fp32, cpu) is None
    with autocast(fp32, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    bf16 = choose_precision("bf16", "cpu", True)
    with autocast(bf16, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("capability", "native"), [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)]
)
def test_bf16_needs_compute_capability_8(capability, native):
    # A T4 (7.5) only emulates bf16 (torch.cuda.is_bf16_supported() still says True): it must get fp16.
    from iddpm.precision import bf16_native_capability

    assert bf16_native_capability(capability) is native
    assert choose_precision("auto", "cuda", native).name == ("bf16" if native else "fp16")
