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
