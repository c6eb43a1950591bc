"""report.verdict_of: the bound stage and advice that fits the run (no advice to use what is already in use)."""
from __future__ import annotations

from featshard.runner.report import verdict_of


def test_decode_bound_advice_depends_on_the_decoder() -> None:
    stages = {"wait_data": 6.0, "model": 3.0, "h2d": 0.5, "write": 0.5, "wait_first": 30.0}
    assert verdict_of(stages, "fp32", "exact").startswith("decode-bound: 60%")
    assert "--decode fast" in verdict_of(stages, "fp32", "exact")
    assert "--decode fast" not in verdict_of(stages, "fp32", "fast")


def test_model_bound_advice_depends_on_the_precision() -> None:
    stages = {"wait_data": 1.0, "model": 8.0, "h2d": 0.5, "write": 0.5}
    assert verdict_of(stages, "fp32").startswith("model-bound: 85%")
    assert "no native bf16" in verdict_of(stages, "fp32")
    assert "bf16" not in verdict_of(stages, "bf16") and "--graph compile" in verdict_of(stages, "bf16")


def test_write_bound_and_nothing_done() -> None:
    assert verdict_of({"write": 5.0, "model": 1.0}).startswith("write-bound")
    assert verdict_of({}).startswith("nothing processed")


def test_overlapped_stages_are_shares_of_the_loop_and_device_decode_can_bind() -> None:
    """On a GPU the stages overlap: shares are of the loop's wall time; a device decode slower than the model is the
    device's bound (booked as decode, not h2d)."""
    gpu = {"wait_data": 0.2, "model": 9.5, "h2d": 0.3, "decode": 4.0, "write": 0.1, "loop": 10.0}
    assert verdict_of(gpu, "bf16", "gpu").startswith("model-bound: 98%")
    slow_decode = {**gpu, "decode": 9.9, "model": 5.0}
    assert verdict_of(slow_decode, "bf16", "gpu").startswith("device-decode-bound: 99%")
    starved = {**gpu, "wait_data": 4.0}
    assert verdict_of(starved, "bf16", "fast").startswith("decode-bound: 40%")
