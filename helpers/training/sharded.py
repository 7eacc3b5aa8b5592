"""FSDP-QLoRA: one run trained on num_gpus processes, each holding 1/num_gpus of the model (notebook 01, num_gpus > 1).

With num_gpus 1 none of this runs: the notebook keeps its one-process path (the Trainer). With more, the training
cell calls launch(), which starts num_gpus processes with accelerate's notebook_launcher; each process (rank) does
what sections 2 and 4-8 do in one process, in this order:

    process group   nccl on GPUs (rank r on cuda:r of the visible ones), gloo on the CPU (device cpu: for tests)
    budget          vram_budget_gib caps each GPU's allocator (runs.apply_vram_budget): an emulated card per rank
    load            on the CPU, with the 4-bit weights stored in the run's dtype (models.bnb_config(sharded=True),
                    bnb_4bit_quant_storage): FSDP1 flattens each wrapped module's parameters into one tensor of one
                    floating dtype, so every parameter has the run's dtype -- packed 4-bit words, norms, embeddings
                    and the LoRA adapters alike (no float32 upcast: QLoRA's norms and head stay in the compute dtype,
                    as with keep_16bit, and the adapters and their AdamW step are in that dtype too; the 1-GPU QLoRA
                    arm keeps them in float32). A checkpoint written pre-quantized is read as written.
    LoRA            train.attach_lora, seeded alike on every rank, so every rank starts from the same adapters
    wrap            FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel; FSDP2 and packed 4-bit weights corrupt
                    each other in current releases), full shard, peft's fsdp_auto_wrap_policy: a unit per decoder
                    layer and one per trainable LoRA matrix, so frozen and trainable parameters never share a flat
                    parameter (no gradient is allocated for frozen weights), use_orig_params=True so peft and the
                    optimizer see the original parameters; FSDP moves each unit's shard to the rank's GPU as it wraps
                    (bitsandbytes moves a weight's quantization constants along: they are attributes, not
                    parameters, so every GPU holds all of them, ~1/64 byte per weight with double quant).
                    fsdp_cpu_offload: parameters (and their gradients and optimizer step) stay in host memory and
                    reach the GPU one unit at a time; the quantization constants are put on the GPU.
    evaluate        perplexity before and after on every rank (FSDP needs every rank in each forward); they agree
    train           the Trainer's recipe by hand (the Trainer's FSDP path needs accelerate's multi-GPU state, which
                    a CPU test cannot have): AdamW (or SGD) with the linear warm-up and decay, gradients clipped at
                    norm 1.0 over all shards, grad_accum micro-batches per step. Each optimizer step takes one global
                    batch of batch_size x num_gpus x grad_accum blocks, rank r the r-th batch_size of each
                    micro-batch, in one seeded order: exactly the blocks one process with batch_size x num_gpus
                    would see (tests/test_sharded.py holds the losses equal).
    record          each rank writes its figures to a file; the parent aggregates them into the one sidecar
                    (aggregate(): what each aggregate means).

The parent (the notebook's kernel) must not start CUDA or import bitsandbytes before the processes are forked
(accelerate refuses, and CUDA cannot be used in a process forked after it started): with num_gpus > 1 the notebook
validates, fetches and tokenizes without them (runs.sharding_problems(), fetch(), runs.environment(init_cuda=False)).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from helpers.records.paths import PROJECT_ROOT
from helpers.records.registry import SYNTHETIC

MAX_GRAD_NORM = 1.0  # the Trainer's default clipping, kept so a sharded step is the Trainer's step
# Per-GPU figures: the sidecar keeps each GPU's value as a list (key_per_gpu) and the largest under the plain key,
# so a chart of peak_reserved_gib shows what the fullest card needed.
PER_GPU = ("peak_allocated_gib", "peak_reserved_gib", "peak_nvml_process_used_gib", "peak_nvml_device_used_gib",
           "non_torch_peak_gib", "peak_process_est_gib", "cuda_context_gib", "sharded_weights_gib")
SLOWEST = ("load_s", "eval_before_s", "train_s", "eval_after_s")  # the run waits for its slowest process


def fetch(model: str, timings: dict):
    """Section 2's fetch for a sharded run, in the parent: the weights into the cache (a synthetic checkpoint is
    written in a child process: the writer uses CUDA), timed as timings["fetch_s"]; returns the tokenizer (None for a
    synthetic model). helpers.telemetry is not imported here: it imports the Trainer, which imports bitsandbytes."""
    from helpers.training.models import resolve_model
    from helpers.records.registry import cache_dir

    t0 = time.perf_counter()
    if model in SYNTHETIC and not (cache_dir() / model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "helpers.training.models", model], cwd=PROJECT_ROOT, check=True)
    source = resolve_model(model)
    timings["fetch_s"] = time.perf_counter() - t0
    if model in SYNTHETIC:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: dict, train_blocks, eval_blocks) -> None:
    """Train run's configuration on num_gpus processes (accelerate's notebook_launcher) and aggregate their figures
    into run (metrics, history, environment). The error of the process that failed first (its out-of-memory
    included) is raised here with its rank and text, so runs.guard records it like a one-process failure; the
    others' (stopped by the launcher, or failing while they waited for it) are its consequences."""
    from accelerate import notebook_launcher

    config = run["config"]
    n = config["num_gpus"]
    folder = Path(tempfile.mkdtemp(prefix=f"qlora-study-{run['run_id']}-ranks-"))  # the processes share this host
    try:
        try:
            notebook_launcher(rank_main, args=(config, train_blocks, eval_blocks, str(folder), run["sidecar"]),
                              num_processes=n, use_port=str(_free_port()))
        except BaseException as e:
            failed = sorted((r for r in _read_ranks(folder) if r.get("error")), key=lambda r: r["failed_at"])
            if failed:  # the process that failed first, in its own words: the others were stopped because of it
                first = failed[0]  # (the launcher's SIGTERM) or failed waiting for it, later
                raise RuntimeError(f"{n} processes: rank {first['rank']}: {first['error']}") from e
            raise
        ranks = _read_ranks(folder)
        if len(ranks) != n:
            raise RuntimeError(f"{len(ranks)} of {n} processes reported their figures")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    metrics, history, env = aggregate(ranks)
    run["metrics"].update(metrics)
    run["history"] = history
    run["environment"].update(env)


def _read_ranks(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]))]


def rank_main(config: dict, train_blocks, eval_blocks, folder: str, sidecar: str | None = None) -> None:
    """One process of a sharded run (what notebook_launcher starts): its figures, or its error, into folder."""
    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    # A process forked from the notebook's kernel cannot draw the kernel's progress widgets: each update of the
    # weight-loading bar would print "attempted to send message from fork" (1,429 of them in one 70B sweep's log).
    hf_logging.disable_progress_bar()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    on_gpu = str(config["device"]) != "cpu"
    device = f"cuda:{local}" if on_gpu else "cpu"
    out = {"rank": rank, "device": device, "error": None}
    try:
        if on_gpu:
            torch.cuda.set_device(local)
        else:  # the processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if on_gpu else "gloo")
        out.update(train_rank(config, device, train_blocks, eval_blocks, rank, world, sidecar if rank == 0 else None))
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["failed_at"] = time.time()  # one host's clock: which process failed first (launch() reports that one)
        raise
    finally:
        from helpers.records.files import atomic_write

        atomic_write(Path(folder) / f"rank{rank}.json", json.dumps(out, default=float))
        if dist.is_initialized():
            dist.destroy_process_group()


def _uniform_dtype(model, dtype) -> None:
    """Every floating parameter in `dtype` (peft makes adapters float32 beside a 16-bit base): FSDP1 flattens one
    dtype. The packed 4-bit weights already have it (bnb_config(sharded=True))."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(dtype)


def wrap(model, device: str, cpu_offload: bool):
    """The model under FSDP1 as the module docstring says; the 4-bit quantization constants on the compute device."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from helpers.training.quantized import quantized_layers

    net = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
               sharding_strategy=ShardingStrategy.FULL_SHARD, cpu_offload=CPUOffload(offload_params=cpu_offload),
               device_id=torch.device(device), limit_all_gathers=True, sync_module_states=False)
    for _, m in quantized_layers(net):  # with offload FSDP leaves them on the host; moving twice costs nothing
        for state in (getattr(m.weight, "quant_state", None), getattr(m, "quant_state", None)):
            if state is not None:
                state.to(torch.device(device))
    return net


def _optimizer(params, name: str, lr: float):
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=name == "adamw_torch_fused")


def batch_rows(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int, n_blocks: int,
               seed: int) -> list[int]:
    """Which train blocks rank `rank` takes for micro-batch `micro` of optimizer step `step`: one seeded order of the
    blocks (a new one each epoch), cut into global micro-batches of batch_size x world, rank r taking the r-th
    batch_size of each. With world 1 and batch_size x world this gives the same blocks in the same order."""
    import torch

    per_step = batch_size * world * grad_accum
    start = step * per_step + micro * batch_size * world + rank * batch_size
    rows = []
    for i in range(start, start + batch_size):
        epoch, k = divmod(i, n_blocks)
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(order[k]))
    return rows


def train_rank(config: dict, device: str, train_blocks, eval_blocks, rank: int, world: int,
               progress_sidecar: str | None = None) -> dict:
    """Sections 2 and 4-8 in one process of a sharded run; returns its figures (metrics, history, gpu_uuid)."""
    import torch
    import torch.distributed as dist
    from transformers import get_linear_schedule_with_warmup, set_seed

    from helpers.training import models, runs, telemetry
    from helpers.training.evaluate import perplexity
    from helpers.training.train import attach_lora

    c, m = config, {}
    m.update(telemetry.gpu_baseline(device))
    runs.apply_vram_budget({"config": c, "metrics": m})
    dtype = models.resolve_dtype(c["dtype"], device)
    with telemetry.phase("load", m, device):
        net, _, info = models.load_model(c["model"], c["quant"], dtype, c["double_quant"], device="cpu", sharded=True)
    m.update(info)
    set_seed(c["seed"])  # the same adapters on every rank
    net = attach_lora(net, c["quant"], c["lora_r"], c["lora_alpha"], c["lora_dropout"], c["target_modules"],
                      c["gradient_checkpointing"], keep_16bit=c["quant"] != "none")
    _uniform_dtype(net, models.DTYPES[dtype])
    m["params_trainable"], _ = models.count_parameters(net)
    if world > 1:
        net = wrap(net, device, c["fsdp_cpu_offload"])
    else:  # one process (the tests' reference): the same loop, no FSDP
        net = net.to(device)
    # this GPU's memory once wrapped: its shard of the weights and adapters, and every layer's quantization constants
    m["sharded_weights_gib"] = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
    bs = c["batch_size"]
    with telemetry.phase("eval_before", m, device):
        m["ppl_before"] = perplexity(net, eval_blocks, batch_size=bs * 2, device=device)["ppl"]

    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(params, c["optimizer"], c["learning_rate"])
    sched = get_linear_schedule_with_warmup(opt, c["warmup_steps"], c["max_steps"])
    steps = telemetry.StepTelemetry(device)
    progress = telemetry.ProgressFile(runs.progress_path(progress_sidecar)) if progress_sidecar else None
    state = SimpleNamespace(global_step=0, max_steps=c["max_steps"])
    with telemetry.phase("train", m, device):
        steps.on_train_begin(None, state, None)
        if progress:
            progress.on_train_begin(None, state, None)
        for step in range(c["max_steps"]):
            batches = []
            for micro in range(c["grad_accum"]):
                rows = batch_rows(step, micro, rank, world, bs, c["grad_accum"], len(train_blocks), c["seed"])
                x = train_blocks[rows]
                batches.append({"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)})
            steps.count_batches(batches)
            steps.on_step_begin(None, state, None)
            loss = torch.zeros((), device=device)
            for b in batches:
                micro_loss = net(**{k: v.to(device) for k, v in b.items()}).loss / c["grad_accum"]
                micro_loss.backward()
                loss += micro_loss.detach().float()
            if world > 1:
                net.clip_grad_norm_(MAX_GRAD_NORM)  # the norm over every rank's shard
            else:
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            lr = sched.get_last_lr()[0]
            sched.step()
            opt.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss)  # each rank's mean over its equal share of tokens: their mean is the batch's
                loss /= world
            state.global_step = step + 1
            steps.on_step_end(None, state, None)
            steps.on_log(None, state, None, logs={"loss": loss.item(), "learning_rate": lr})
            if progress:
                progress.on_step_end(None, state, None)
        steps.on_train_end(None, state, None)
    m.update(steps.summary(c["timing_warmup_steps"]))
    with telemetry.phase("eval_after", m, device):
        m["ppl_after"] = perplexity(net, eval_blocks, batch_size=bs * 2, device=device)["ppl"]
    m.update(telemetry.memory_peaks(device, steps.nvml, steps.history))
    return {"metrics": m, "history": steps.history, "energy_window": [steps.energy_start_j, steps.energy_end_j],
            "sampled_energy_j": steps.sampled_energy_j,
            "window_s": steps.window_s, "timing_warmup_steps": c["timing_warmup_steps"],
            "environment": runs.environment(device)}


def aggregate(ranks: list[dict]) -> tuple[dict, list[dict], dict]:
    """The processes' figures as one run's (metrics, history, environment additions). What each aggregate means:

        peaks per GPU       PER_GPU keys: `<key>_per_gpu` lists each GPU's own figure (rank order); `<key>` is the
                            largest, what the fullest card needed (a card of that size fits the run)
        host memory         peak_rss_gib: the processes' peak resident memory summed (an upper bound of the host's
                            peak: the peaks need not coincide, and pages a process shares with the kernel it was
                            forked from count in each); peak_rss_gib_per_process lists them
        time                load_s, eval_*_s, train_s: the slowest process's; a step's time (history) is its
                            slowest process's step time, as the step ends when the last gradient shard is reduced
        tokens              a step's tokens and tokens_trained: summed over processes (the global batch);
                            tokens_per_s = steady tokens of all processes / steady time of the step-wise slowest
        energy              energy_j: the GPUs' NVML counters over their training windows, summed (J for the whole
                            run); per 1k tokens divides it by all processes' tokens; mean_power_w: summed energy over
                            the longest window (the power of all GPUs together). Absent if any GPU has no counter
        loss                a step's loss is the global batch's (each rank's mean, averaged: equal token counts)
        perplexity, params  rank 0's (every rank scores the same blocks with the same weights)
    """
    from helpers.training.telemetry import StepTelemetry

    first = ranks[0]
    m = dict(first["metrics"])
    for key in PER_GPU:
        values = [r["metrics"].get(key) for r in ranks]
        m[f"{key}_per_gpu"] = values
        m[key] = None if None in values else max(values)
    rss = [r["metrics"]["peak_rss_gib"] for r in ranks]
    m["peak_rss_gib_per_process"], m["peak_rss_gib"] = rss, sum(rss)
    for key in SLOWEST:
        m[key] = max(r["metrics"][key] for r in ranks)
    history = []
    for rows in zip(*(r["history"] for r in ranks)):
        row = dict(rows[0])  # memory readings: rank 0's (the per-GPU peaks above cover every GPU)
        row["step_time_s"] = max(x["step_time_s"] for x in rows)
        row["tokens"] = None if None in [x["tokens"] for x in rows] else sum(x["tokens"] for x in rows)
        energies = [x["energy_j"] for x in rows]
        row["energy_j"] = None if None in energies else sum(energies)
        powers = [x["power_w"] for x in rows]
        row["power_w"] = None if None in powers else sum(powers)
        history.append(row)
    whole = StepTelemetry("cpu")  # its summary's definitions, over the merged steps
    whole.history = history
    windows = [r["energy_window"] for r in ranks]
    if all(a is not None and b is not None for a, b in windows):
        whole.energy_start_j, whole.energy_end_j = 0.0, sum(b - a for a, b in windows)
    whole.sampled_energy_j = sum(r["sampled_energy_j"] for r in ranks)  # the fallback where a GPU has no counter
    whole.window_s = max(r["window_s"] for r in ranks)
    m.update(whole.summary(first["timing_warmup_steps"]))
    m["num_processes"] = len(ranks)
    m["sharding"] = ("FSDP1 full shard, a unit per decoder layer and per LoRA matrix, use_orig_params; every "
                     "parameter in the run's dtype")
    # the GPU as the parent could not ask (runs.environment(init_cuda=False)): rank 0's, and every rank's UUID
    env = {k: first["environment"][k] for k in ("device_name", "device_total_gib", "gpu_uuid")}
    env.update(gpu_uuids=[r["environment"]["gpu_uuid"] for r in ranks], devices=[r["device"] for r in ranks])
    return m, history, env

