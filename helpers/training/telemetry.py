"""Measurements: phase wall times, per-step telemetry, memory peaks, NVML energy.

Every step row is a flat dict with the same keys every step, in the units its name says; a value
that does not exist on this device is None (never 0), so charts can tell "absent" from "zero".
"""
import json
import os
import resource
import time
from contextlib import contextmanager

import psutil
import torch
from transformers import TrainerCallback

from helpers.records.files import atomic_write
from helpers.training.levers import IGNORE_INDEX

GIB = 2**30


def sync(device: str) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def phase(name: str, timings: dict, device: str = "cpu"):
    """Record the wall time of a block as timings[f"{name}_s"] (device-synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        timings[f"{name}_s"] = time.perf_counter() - t0


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# NVML memory used on the device before this process made its CUDA context (set by gpu_baseline); lets
# used_gib() estimate this process's use where NVML cannot list our pid (some containers).
_DEVICE_USED_BEFORE_GIB: float | None = None


def _cuda_index(device: str) -> int:
    """torch's device index without initialising CUDA ('cuda' means the current device, 0 unless set)."""
    _, _, n = str(device).partition(":")
    return int(n) if n else (torch.cuda.current_device() if torch.cuda.is_initialized() else 0)


class Nvml:
    """The NVML readings we use, or None for each where NVML (or the counter) is missing."""

    def __init__(self, device: str):
        self.handle = None
        if not str(device).startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = _cuda_index(device)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            self.nvml = pynvml
            # NVML numbers all GPUs (PCI bus order, CUDA's too under CUDA_DEVICE_ORDER=PCI_BUS_ID, as helpers.sweep
            # pins runs); torch only the visible ones, which CUDA_VISIBLE_DEVICES names by index or UUID
            entry = visible.split(",")[index].strip() if visible else str(index)
            self.handle = (pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
                           else pynvml.nvmlDeviceGetHandleByUUID(entry))
        except Exception:
            self.handle = None

    def _milli(self, reading: str) -> float | None:
        """An NVML reading in thousandths (mJ, mW) as units; None where there is no GPU or it has no such reading."""
        if self.handle is None:
            return None
        try:
            return getattr(self.nvml, reading)(self.handle) / 1000.0
        except Exception:
            return None

    def energy_j(self) -> float | None:
        """Total energy counter since driver load (J); None where the GPU has none."""
        return self._milli("nvmlDeviceGetTotalEnergyConsumption")

    def power_w(self) -> float | None:
        return self._milli("nvmlDeviceGetPowerUsage")

    def used_gib(self) -> tuple[float | None, float | None]:
        """(memory used by this process, memory used on the whole device), GiB.

        Includes what torch does not see: the CUDA context and bitsandbytes' paged memory.
        Where NVML cannot see our pid (e.g. in a container), the process figure is the device's used
        memory minus what was used before our CUDA context (gpu_baseline), if that was read; else None.
        """
        if self.handle is None:
            return None, None
        try:
            device = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / GIB
        except Exception:
            return None, None
        proc = None
        try:
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    proc = p.usedGpuMemory / GIB
        except Exception:
            pass
        if proc is None and _DEVICE_USED_BEFORE_GIB is not None:
            proc = device - _DEVICE_USED_BEFORE_GIB
        return proc, device


def gpu_baseline(device: str) -> dict:
    """Before the model loads: device memory used by others, then the size of our CUDA context.

    cuda_context_gib = NVML's used memory of this process right after the context is made, minus what
    torch has reserved by then (one small block). It is outside any allocator cap (vram_budget_gib).
    """
    global _DEVICE_USED_BEFORE_GIB
    _DEVICE_USED_BEFORE_GIB = None
    out = {"nvml_device_used_before_gib": None, "cuda_context_gib": None}
    if not str(device).startswith("cuda"):
        return out
    nvml = Nvml(device)
    initialised = torch.cuda.is_initialized()  # torch may be initialised with or without a context yet
    proc0, used0 = nvml.used_gib()
    x = torch.empty(1, device=device)  # makes the context, if not made yet
    sync(device)
    proc1, used1 = nvml.used_gib()
    # NVML lists our pid once we have a context: then what we held before (0 if unlisted) is known exactly;
    # where it never lists it (some containers), "before" is only known if torch had not started yet
    if used0 is not None and (proc1 is not None or not initialised):
        _DEVICE_USED_BEFORE_GIB = used0 - (proc0 or 0.0)
        out["nvml_device_used_before_gib"] = _DEVICE_USED_BEFORE_GIB
    if proc1 is None and out["nvml_device_used_before_gib"] is not None and used1 is not None:
        proc1 = used1 - out["nvml_device_used_before_gib"]
    if proc1 is not None:
        out["cuda_context_gib"] = proc1 - torch.cuda.memory_reserved() / GIB
    del x
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def memory_now(device: str, nvml: Nvml | None = None) -> dict:
    """Memory readings with the same keys on every device (None where not applicable)."""
    row = {
        "rss_gib": psutil.Process().memory_info().rss / GIB,
        "allocated_gib": None,
        "reserved_gib": None,
        "nvml_process_used_gib": None,
        "nvml_device_used_gib": None,
        "non_torch_gib": None,  # NVML process used - torch reserved, read together: context, cuBLAS, paged memory
    }
    if str(device).startswith("cuda"):
        row["allocated_gib"] = torch.cuda.memory_allocated() / GIB
        row["reserved_gib"] = torch.cuda.memory_reserved() / GIB
        if nvml is not None and nvml.handle is not None:
            row["nvml_process_used_gib"], row["nvml_device_used_gib"] = nvml.used_gib()
            if row["nvml_process_used_gib"] is not None:
                row["non_torch_gib"] = row["nvml_process_used_gib"] - row["reserved_gib"]
    return row


def memory_peaks(device: str, nvml: Nvml | None = None, history=()) -> dict:
    """Peaks since the last reset: torch allocator and NVML on a GPU, resident memory on the host.

    NVML has no peak counter: peak_nvml_* are the largest readings at step ends (`history`) and now.
    They can miss the true peak (the allocator gives cached memory back when a cap is hit, and load and
    eval peaks fall outside the training steps), so the process peak is estimated from torch's exact peak:
    peak_process_est_gib = peak_reserved_gib + non_torch_peak_gib, where non_torch_peak_gib is the largest
    (NVML process used - torch reserved) read at one instant: the CUDA context, cuBLAS and other libraries'
    memory and bitsandbytes' paged memory, none of which an allocator cap (vram_budget_gib) limits.
    """
    out = {"peak_rss_gib": peak_rss_gib(), "peak_allocated_gib": None, "peak_reserved_gib": None,
           "peak_nvml_process_used_gib": None, "peak_nvml_device_used_gib": None, "non_torch_peak_gib": None,
           "peak_process_est_gib": None}
    if not str(device).startswith("cuda"):
        return out
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    nvml = nvml if nvml is not None else Nvml(device)
    rows = [*history, memory_now(device, nvml)]

    def peak(key):
        xs = [r.get(key) for r in rows if r.get(key) is not None]
        return max(xs) if xs else None

    out["peak_nvml_process_used_gib"] = peak("nvml_process_used_gib")
    out["peak_nvml_device_used_gib"] = peak("nvml_device_used_gib")
    out["non_torch_peak_gib"] = peak("non_torch_gib")
    if out["non_torch_peak_gib"] is not None:
        out["peak_process_est_gib"] = out["peak_reserved_gib"] + out["non_torch_peak_gib"]
    return out


def loss_tokens(batch: dict) -> int:
    """Tokens that carry loss in one micro-batch: label positions after the first (the model predicts token t+1
    from tokens up to t) that are not ignored, as transformers' causal-LM loss counts them."""
    labels = batch["labels"]
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class StepTelemetry(TrainerCallback):
    """Trainer callback: one row per optimizer step, plus energy over the training window.

    A step's tokens are the loss tokens actually in its micro-batches (count_batches, which
    helpers.training.train.make_trainer's Trainer calls as it fetches them: the last batch of an epoch can hold fewer
    blocks); tokens_per_step is only the fallback for a Trainer that does not count. step_begin_s is when the step
    began, in seconds of training since on_train_begin (evaluations left out), so tokens/s can be taken over the
    whole window of the steady steps (data loading, logging and telemetry between steps included) as well as over
    the steps alone.
    """

    def __init__(self, device: str, tokens_per_step: int | None = None):
        self.device = device
        self.tokens_per_step = tokens_per_step
        self.nvml = Nvml(device)
        self.history: list[dict] = []
        self.energy_start_j = self.energy_end_j = None
        self.window_s = None  # the training window the energy covers
        self._t0 = self._train_t0 = self._e0 = None
        self._last_power = None
        self._step_tokens = None  # counted for the step about to run (count_batches)
        self.sampled_energy_j = 0.0  # fallback: power sampled at step ends x step time
        self.excluded_s, self.excluded_j = 0.0, 0.0  # work inside the window that is not training (evaluations)

    def count_batches(self, batches) -> None:
        """The micro-batches of the coming optimizer step, as the Trainer fetched them: their loss tokens."""
        self._step_tokens = sum(loss_tokens(b) for b in batches)

    def on_train_begin(self, args, state, control, **kw):
        sync(self.device)
        self.energy_start_j = self.nvml.energy_j()
        self._train_t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        sync(self.device)
        self._e0 = self.nvml.energy_j()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync(self.device)
        dt = time.perf_counter() - self._t0
        e1 = self.nvml.energy_j()
        power = self.nvml.power_w()
        if power is not None:
            self.sampled_energy_j += power * dt
        tokens = self._step_tokens if self._step_tokens is not None else self.tokens_per_step
        self._step_tokens = None
        row = {
            "step": state.global_step,
            "step_time_s": dt,
            "step_begin_s": None if self._train_t0 is None else self._t0 - self._train_t0 - self.excluded_s,
            "tokens": tokens,
            "loss": None,
            "learning_rate": None,
            "power_w": power,
            "energy_j": _delta(self._e0, e1),  # this step's
        }
        row.update(memory_now(self.device, self.nvml))
        self.history.append(row)

    def on_log(self, args, state, control, logs=None, **kw):
        # the end-of-training summary log (train_loss, runtime) has no "loss": leave the step row alone
        if logs and "loss" in logs and self.history and self.history[-1]["step"] == state.global_step:
            self.history[-1]["loss"] = logs.get("loss")
            self.history[-1]["learning_rate"] = logs.get("learning_rate")

    def exclude(self, seconds: float, energy_j: float | None) -> None:
        """Leave out of the training window's time and energy something that ran inside it (an evaluation)."""
        self.excluded_s += seconds
        self.excluded_j += energy_j or 0.0

    @contextmanager
    def outside_training(self):
        """Measure the work in this block (device-synchronised time, NVML energy) and exclude it."""
        sync(self.device)
        e0, t0 = self.nvml.energy_j(), time.perf_counter()
        yield
        sync(self.device)
        self.exclude(time.perf_counter() - t0, _delta(e0, self.nvml.energy_j()))

    def on_train_end(self, args, state, control, **kw):
        sync(self.device)
        self.energy_end_j = self.nvml.energy_j()
        self.window_s = time.perf_counter() - self._train_t0 - self.excluded_s

    def summary(self, warmup_steps: int) -> dict:
        """Steady-state throughput (after warm-up steps) and energy over the training window."""
        steady = self.history[warmup_steps:] or self.history
        t = sum(r["step_time_s"] for r in steady)
        counted = None not in [r["tokens"] for r in self.history]
        tokens = sum(r["tokens"] for r in steady) if counted else None
        all_tokens = sum(r["tokens"] for r in self.history) if counted else None
        # the window: from the first steady step's start to the last step's end (evaluations left out)
        begin, last = (steady[0].get("step_begin_s"), steady[-1].get("step_begin_s")) if steady else (None, None)
        window = last + steady[-1]["step_time_s"] - begin if begin is not None and last is not None else None
        out = {
            "steps": len(self.history),
            "tokens_trained": all_tokens,
            "tokens_per_s": tokens / t if t and tokens is not None else None,  # over the steps alone
            "steady_window_s": window,
            "tokens_per_s_window": tokens / window if window and tokens is not None else None,
            "step_time_median_s": _median([r["step_time_s"] for r in steady]),
            "energy_j": None,
            "energy_source": None,
            "energy_window_s": self.window_s,
        }
        if self.energy_start_j is not None and self.energy_end_j is not None:
            out["energy_j"] = self.energy_end_j - self.energy_start_j - self.excluded_j
            out["energy_source"] = "nvml_counter"
        elif any(r["power_w"] is not None for r in self.history):
            out["energy_j"], out["energy_source"] = self.sampled_energy_j, "nvml_power_sampled"
        e = out["energy_j"]
        # whole window (warm-up steps included): energy per token covers everything the tokens cost
        out["energy_j_per_1k_tokens"] = e / all_tokens * 1000 if e is not None and all_tokens else None
        out["mean_power_w"] = e / self.window_s if e is not None and self.window_s else None
        # the steps tokens/s counts (warm-up and compilation left out): what a token costs in a long run
        steady_e = [r.get("energy_j") for r in steady]
        out["energy_steady_j_per_1k_tokens"] = (sum(steady_e) / tokens * 1000
                                                if tokens and steady_e and None not in steady_e else None)
        return out


def _delta(before: float | None, after: float | None) -> float | None:
    """after - before of a counter, None where either reading is missing (no counter: absent, not zero)."""
    return after - before if before is not None and after is not None else None


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


class ProgressFile(TrainerCallback):
    """After every optimizer step, rewrite a small JSON file: step, max_steps, seconds since training began and
    the process's resident memory. The sweep polls it to show the running run's step and time left, and reads
    the last memory figure if the kernel is killed (helpers.sweep). Best effort: a failed write (a full disk)
    never stops training; the sidecar and the executed notebook are what count.
    """

    def __init__(self, path):
        self.path = path
        self.t0 = time.perf_counter()

    def _write(self, state) -> None:
        row = {"step": state.global_step, "max_steps": state.max_steps,
               "elapsed_s": time.perf_counter() - self.t0, "rss_gib": psutil.Process().memory_info().rss / GIB}
        try:
            atomic_write(self.path, json.dumps(row), durable=False)
        except OSError:
            pass

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self._write(state)

    def on_step_end(self, args, state, control, **kw):
        self._write(state)
