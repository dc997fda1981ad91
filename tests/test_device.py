"""device.py: device and precision choices, measured on CPUs rather than read from flags."""
import pytest
import torch

import device
from common import UserError


def test_device_and_dtype_choices_refuse_what_cannot_run_here():
    assert device.resolve_device("cpu") == "cpu" and device.resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        device.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda:1' is not available on this machine"):
            device.resolve_device("cuda:1")
    with pytest.raises(UserError, match="float16 is emulated on CPUs"):
        device.amp_dtype("cpu", "float16")
    with pytest.raises(UserError, match="dtype must be auto, float32, bfloat16 or float16, not 'fp8'"):
        device.amp_dtype("cpu", "fp8")
    assert device.amp_dtype("cpu", "float32") is None and device.amp_dtype("cpu", "bfloat16") == torch.bfloat16


@pytest.mark.parametrize("bf16, fp32, expected", [(396.0, 156.0, torch.bfloat16), (142.0, 233.0, None)])
def test_cpu_auto_dtype_follows_the_measured_matmul_speed(monkeypatch, bf16, fp32, expected):
    """dtype=auto on a CPU picks whichever matmul measured faster (not what the CPU flags promise); an explicit
    dtype is never measured."""
    monkeypatch.setattr(device, "cpu_matmul_gflops", lambda: {"float32": fp32, "bfloat16": bf16})
    choice, reason = device.cpu_auto_dtype()
    assert choice == expected and device.amp_dtype("cpu") == expected and device.amp_dtype("cpu", "auto") == expected
    assert reason.startswith(f"{'bfloat16' if expected else 'float32'} (bf16 matmul {bf16:.0f} GFLOP/s vs fp32 "
                             f"{fp32:.0f} on this CPU")
    monkeypatch.setattr(device, "cpu_matmul_gflops", lambda: pytest.fail("an explicit dtype was measured"))
    assert device.amp_dtype("cpu", "float32") is None and device.amp_dtype("cpu", "bfloat16") == torch.bfloat16


def test_cpu_matmul_speed_is_measured_once_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(device, "_MATMUL_GFLOPS", {})
    state = torch.get_rng_state()
    speed = device.cpu_matmul_gflops(n=64, reps=1)
    assert set(speed) == {"float32", "bfloat16"} and all(v > 0 for v in speed.values())
    assert device.cpu_matmul_gflops() is speed and torch.equal(torch.get_rng_state(), state)


def test_inference_dtype_keeps_small_models_in_fp32_on_a_cpu():
    assert device.inference_dtype("cpu", "auto", 3e6) == torch.float32
    assert device.inference_dtype("cpu", "bfloat16", 3e6) == torch.bfloat16
    assert device.inference_dtype("cpu", "float32", 200e6) == torch.float32
    assert device.inference_dtype("cpu", "auto", 200e6) == (device.amp_dtype("cpu") or torch.float32)


def test_peak_flops_on_a_cpu_is_the_measured_matmul_speed(monkeypatch):
    """MFU's denominator (train.py, bench.py) is measured, never looked up by device name."""
    monkeypatch.setattr(device, "cpu_matmul_gflops", lambda: {"float32": 150.0, "bfloat16": 400.0})
    assert device.peak_flops("cpu") == 150e9 and device.peak_flops("cpu", torch.bfloat16) == 400e9
