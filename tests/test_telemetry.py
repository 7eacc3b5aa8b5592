"""GPU telemetry logic, checked on a CPU with NVML and torch.cuda readings stood in for."""
import json
import math

import pytest
import torch

from helpers.training import runs, telemetry
from tests.conftest import base_config

GIB = 2**30


class FakeNvml:
    handle = object()

    def __init__(self, proc, device):
        self.reading = (proc, device)

    def used_gib(self):
        return self.reading


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda peaks and card size as a 16 GiB card would report them; records the allocator cap."""
    state = {"fraction": None}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(5.8 * GIB))  # the cache gave some back
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 16 * GIB})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *a: state.update(fraction=f))
    return state


def test_memory_peaks_take_nvml_maximum_and_non_torch_part(fake_cuda):
    history = [{"nvml_process_used_gib": 6.2, "nvml_device_used_gib": 7.0, "non_torch_gib": 0.74},
               {"nvml_process_used_gib": 6.9, "nvml_device_used_gib": 7.5, "non_torch_gib": 0.6},
               {"nvml_process_used_gib": None, "nvml_device_used_gib": None, "non_torch_gib": None}]
    p = telemetry.memory_peaks("cuda", FakeNvml(6.5, 7.2), history)
    assert p["peak_allocated_gib"] == 5 and p["peak_reserved_gib"] == 6
    assert p["peak_nvml_process_used_gib"] == 6.9 and p["peak_nvml_device_used_gib"] == 7.5
    # non-torch is read at one instant (NVML process - torch reserved), never across instants (6.9 - 6 = 0.9)
    assert math.isclose(p["non_torch_peak_gib"], 0.74)
    assert math.isclose(p["peak_process_est_gib"], 6.74)  # torch's exact peak + the non-torch part
    now_only = telemetry.memory_peaks("cuda", FakeNvml(6.5, 7.2), [])
    assert math.isclose(now_only["non_torch_peak_gib"], 6.5 - 5.8)
    none = telemetry.memory_peaks("cuda", FakeNvml(None, None), [])
    assert none["peak_nvml_process_used_gib"] is None and none["non_torch_peak_gib"] is None  # absent, not 0
    assert none["peak_process_est_gib"] is None


def test_memory_peaks_on_cpu_leave_gpu_figures_absent():
    p = telemetry.memory_peaks("cpu")
    assert p["peak_rss_gib"] > 0
    assert all(p[k] is None for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_nvml_process_used_gib"))


def test_energy_over_the_training_window():
    s = telemetry.StepTelemetry("cpu", tokens_per_step=1000)
    s.history = [{"step": i, "step_time_s": 0.5, "tokens": 1000, "power_w": None} for i in range(1, 5)]
    s.energy_start_j, s.energy_end_j, s.window_s = 10_000.0, 11_200.0, 2.4
    out = s.summary(warmup_steps=1)
    assert out["energy_source"] == "nvml_counter" and out["energy_j"] == 1200
    assert out["energy_j_per_1k_tokens"] == 300  # 1200 J over all 4000 tokens of the window
    assert out["mean_power_w"] == 500
    assert out["tokens_per_s"] == 3000 / 1.5  # steady state leaves the warm-up step out


def test_budget_is_applied_as_allocator_cap_and_labelled_emulation(fake_cuda):
    run = {"config": base_config(vram_budget_gib=6.0), "metrics": {}}
    runs.apply_vram_budget(run)
    assert fake_cuda["fraction"] == 6 / 16
    assert run["metrics"]["vram_budget_emulated"] is True and "emulated" in run["metrics"]["vram_budget_note"]
    whole = {"config": base_config(vram_budget_gib=0.0), "metrics": {}}
    runs.apply_vram_budget(whole)
    assert whole["metrics"] == {"vram_budget_emulated": False}
    with pytest.raises(ValueError, match=r"vram_budget_gib=20.0 is more than this card's 16.0 GiB"):
        runs.apply_vram_budget({"config": base_config(vram_budget_gib=20.0), "metrics": {}})


def test_record_memory_checks_budget_with_and_without_context(fake_cuda):
    steps = telemetry.StepTelemetry("cpu", 10)
    steps.nvml = FakeNvml(6.4, 8.0)
    run = {"device": "cuda", "config": base_config(vram_budget_gib=6.0), "metrics": {}}
    runs.record_memory(run, steps)
    m = run["metrics"]
    assert m["peak_reserved_within_budget"] is True  # torch stayed under the cap (6 <= 6)...
    assert math.isclose(m["peak_process_est_gib"], 6 + (6.4 - 5.8))
    assert m["process_within_budget"] is False  # ...but with the CUDA context it would not fit a real 6 GiB card


@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    ("Error out of memory at line 412 in file /src/csrc/pythonInterface.cpp", True),  # bitsandbytes native
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"), False),
    (ValueError("seq_len=9000 is not allowed"), False),
])
def test_oom_is_recognised_in_its_forms(error, oom):
    assert runs.is_oom(error) is oom


@pytest.mark.parametrize("error, status", [
    (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
    (RuntimeError("CUDA error: out of memory"), "oom"),
    (RuntimeError("something else broke"), "error"),
])
def test_guard_writes_a_sidecar_with_the_outcome(tmp_path, error, status):
    run = runs.start(base_config(output_dir=str(tmp_path), device="cpu"))
    with pytest.raises(type(error)), runs.guard(run):
        raise error
    r = runs.read_sidecar(run["sidecar"])
    assert r["status"] == status and str(error) in r["error"]
    assert r["metrics"]["peak_rss_gib"] > 0 and "peak_reserved_gib" in r["metrics"]
    assert json.loads(open(run["sidecar"]).read())["config"]["output_dir"] == str(tmp_path)


class SequenceNvml:
    """NVML readings in turn: one before the CUDA context is made, one after."""
    handle = object()
    readings = []

    def __init__(self, device):
        pass

    def used_gib(self):
        return SequenceNvml.readings.pop(0)


@pytest.mark.parametrize("initialised, readings, before, context", [
    (True, [(None, 1.0), (0.51, 1.51)], 1.0, 0.51),  # torch started, no context yet: our pid appears after
    (True, [(0.51, 1.51), (0.51, 1.51)], 1.0, 0.51),  # context already made: what we held is taken off
    (False, [(None, 1.0), (None, 1.51)], 1.0, 0.51),  # NVML never lists our pid: device used before/after
    (True, [(None, 1.0), (None, 1.51)], None, None),  # ...and torch had started: "before" is unknown
])
def test_gpu_baseline_reads_memory_before_our_context(monkeypatch, initialised, readings, before, context):
    monkeypatch.setattr(telemetry, "Nvml", SequenceNvml)
    SequenceNvml.readings = list(readings)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: "block")
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    out = telemetry.gpu_baseline("cuda")
    for key, want in (("nvml_device_used_before_gib", before), ("cuda_context_gib", context)):
        assert (out[key] is None) if want is None else math.isclose(out[key], want), (key, out)
    assert telemetry.gpu_baseline("cpu") == {"nvml_device_used_before_gib": None, "cuda_context_gib": None}


class CountingNvml:
    """An energy counter read at each step's begin and end: between the two it grows by that step's joules."""
    handle = object()

    def __init__(self, steps_j):
        self.steps_j, self.total, self.begun = list(steps_j), 0.0, False

    def energy_j(self):
        if self.begun:  # a step-end reading: add that step's energy
            self.total += self.steps_j.pop(0)
        self.begun = not self.begun
        return self.total

    def power_w(self):
        return None

    def used_gib(self):
        return (None, None)


def test_steady_energy_counts_the_same_steps_as_tokens_per_s():
    # a compile-like first step that costs 10x: the whole-window figure carries it, the steady one does not
    s = telemetry.StepTelemetry("cpu", tokens_per_step=1000)
    s.nvml = CountingNvml([1000.0, 100.0, 100.0, 100.0])
    state = type("State", (), {"global_step": 0})()
    for i in range(1, 5):
        state.global_step = i
        s.on_step_begin(None, state, None)
        s.on_step_end(None, state, None)
    assert [r["energy_j"] for r in s.history] == [1000.0, 100.0, 100.0, 100.0]
    s.energy_start_j, s.energy_end_j, s.window_s = 0.0, 1300.0, 2.0
    out = s.summary(warmup_steps=1)
    assert out["energy_j_per_1k_tokens"] == 1300 / 4000 * 1000
    assert out["energy_steady_j_per_1k_tokens"] == 300 / 3000 * 1000
    s.history[2]["energy_j"] = None  # one step without a reading: no steady figure rather than a wrong one
    assert s.summary(warmup_steps=1)["energy_steady_j_per_1k_tokens"] is None
