"""bf16 on a CPU without bf16 hardware: detected from /proc/cpuinfo and warned about at model load.

Why a test: on an AVX2-only CPU PyTorch emulates bf16 and a `?dtype=bf16` judge runs several times
slower than fp32 (a 1.5B judge went from minutes to hours per loop stage), with no error anywhere.
The cpuinfo texts below are the shapes Linux prints on x86 and Arm; the load test uses the real
embedded model and this machine's real /proc/cpuinfo.
"""

from __future__ import annotations

import logging

import pytest
import torch

from rlaif.judge.models import cpu_has_native_bf16, emulated_bf16_warning, load_causal_lm

X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c
"""
X86_AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
X86_AMX = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"
ARM_NO_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize(("text", "expected"), [
    (X86_AVX2, False), (X86_AVX512_BF16, True), (X86_AMX, True), (ARM_BF16, True), (ARM_NO_BF16, False),
    ("processor\t: 0\n", None), ("", None),
])
def test_native_bf16_is_read_from_cpu_flags(text, expected):
    assert cpu_has_native_bf16(text) is expected


def test_a_flag_that_only_contains_bf16_does_not_count():
    assert cpu_has_native_bf16("flags\t\t: avx2 avx512_bf16x notbf16\n") is False


def test_warning_only_for_bf16_on_a_cpu_known_to_lack_it():
    message = emulated_bf16_warning("cpu", is_bf16=True, native=False)
    assert message is not None and "dtype=float32" in message
    assert emulated_bf16_warning("cpu", is_bf16=True, native=True) is None
    assert emulated_bf16_warning("cpu", is_bf16=True, native=None) is None  # unknown CPU: say nothing
    assert emulated_bf16_warning("cpu", is_bf16=False, native=False) is None
    assert emulated_bf16_warning("cuda:0", is_bf16=True, native=False) is None


def test_loading_bf16_warns_exactly_when_this_cpu_lacks_bf16(plain_checkpoint_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="rlaif.judge.models"):
        model, _ = load_causal_lm(plain_checkpoint_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    warned = any("without bf16 hardware" in r.getMessage() for r in caplog.records)
    assert warned == (cpu_has_native_bf16() is False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlaif.judge.models"):
        load_causal_lm(plain_checkpoint_dir, dtype="float32", device="cpu")
    assert not any("without bf16 hardware" in r.getMessage() for r in caplog.records)
