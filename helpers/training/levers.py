"""Speed and memory levers for the training step, each off by default so the plain stack stays the reference.

    fused_kernels        Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, and the output head fused with the
                         cross-entropy so the full logits are never held). CUDA only.
    torch_compile        torch.compile each decoder layer (regional compilation: one compiled graph shared by
                         all layers of a shape, so compile time does not grow with depth).
    offload_activations  tensors saved for backward during the forward pass (with checkpointing: the layer
                         inputs, and the head's input) go to pinned host memory and come back in backward. On a
                         GPU the copies overlap compute (HostOffload: out on a side stream, back one tensor ahead
                         of backward on another), parameters and tensors under 1 MiB stay; on a CPU, torch's
                         save_on_cpu. Either way the values that come back are the bits that went out.
    keep_16bit           QLoRA only: skip peft's upcast of norms, embeddings and head to float32 (which doubles
                         their memory); they stay in the compute dtype, as in the 16-bit arm.
    chunked_loss         N > 0: apply the output head and cross-entropy in N chunks of tokens, each
                         recomputed in backward, so the (tokens x vocab) float32 logits are never whole.
    tiled_mlp            N > 0: run each decoder layer's MLP over N slices of the sequence, each slice
                         checkpointed, so only one slice's (tokens x intermediate) activations exist at a time
                         in backward (the idea of DeepSpeed's TiledMLP for long sequences). Built on
                         torch.utils.checkpoint, not Liger's port, which needs Triton: this lever runs on a CPU.

apply_to_base() goes before LoRA is attached (Liger patches the base model's modules), apply_to_peft() after;
training_loss() is the one loss every path uses (the Trainer subclass, the max-context probe, the tests), so a
lever means the same thing everywhere.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers.records.registry import COUNT_LEVERS, LEVERS  # noqa: E402,F401 - the names, defined once (torch-free)
IGNORE_INDEX = -100


def config_of(cfg: dict) -> dict:
    """The lever settings of a run configuration (absent keys: off)."""
    return {k: cfg.get(k, 0 if k in COUNT_LEVERS else False) for k in LEVERS}


def problems(cfg: dict, on_gpu: bool | None) -> list[tuple[str, object, str]]:
    """(name, value, what is allowed) for every lever setting that cannot run; [] when all can.
    on_gpu None: the machine is not the one that will run it (a dry run), so skip device and install checks."""
    out = []
    if cfg.get("fused_kernels") and on_gpu is False:
        out.append(("fused_kernels", True, "False on a CPU (Liger's kernels are Triton: CUDA only)"))
    if cfg.get("fused_kernels") and cfg.get("chunked_loss"):
        out.append(("chunked_loss", cfg["chunked_loss"], "0 with fused_kernels (both replace the head's loss)"))
    if cfg.get("fused_kernels") and on_gpu is not None:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            out.append(("fused_kernels", True, "False unless liger-kernel is installed (pip install -e .[fast])"))
    if cfg.get("keep_16bit") and cfg.get("quant", "none") == "none":
        out.append(("keep_16bit", True, "False for quant none (only QLoRA upcasts norms, embeddings and head)"))
    for name, what in COUNT_LEVERS.items():
        n = cfg.get(name, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            out.append((name, n, f"0 (off) or a whole number of {what} >= 1"))
    return out


def apply_to_base(model, cfg: dict):
    """Levers that change the base model before LoRA: Liger's kernels."""
    if cfg.get("fused_kernels"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)  # rope, rms_norm, swiglu, fused_linear_cross_entropy
    return model


def decoder_layers(model) -> list:
    """The repeated transformer blocks (modules whose class name ends in DecoderLayer)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def tiled(forward, slices: int):
    """forward (an MLP's: [..., seq, hidden] -> same shape) over `slices` slices of the sequence; with grad on,
    each slice is checkpointed, so backward rebuilds one slice's activations at a time (the autograd engine
    runs the slices' independent graphs one after another)."""
    def tiled_forward(x):
        parts = x.chunk(slices, dim=-2)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(forward, p, use_reentrant=False) for p in parts], dim=-2)
        return torch.cat([forward(p) for p in parts], dim=-2)
    return tiled_forward


def apply_to_peft(model, cfg: dict):
    """Levers that go on the model with adapters: tiled MLPs, then regional torch.compile."""
    layers = decoder_layers(model) if cfg.get("tiled_mlp") or cfg.get("torch_compile") else []
    if cfg.get("tiled_mlp"):
        mlps = [layer.mlp for layer in layers if hasattr(layer, "mlp")]
        if not mlps:
            raise ValueError(f"tiled_mlp={cfg['tiled_mlp']} found no decoder layer MLPs in {type(model).__name__}")
        for mlp in mlps:
            mlp.forward = tiled(mlp.forward, cfg["tiled_mlp"])  # the instance's own forward: LoRA and Liger inside
    if cfg.get("torch_compile"):
        if not layers:
            raise ValueError(f"torch_compile=True found no decoder layers in {type(model).__name__} to compile")
        for layer in layers:
            layer.compile()  # nn.Module.compile: the module's __call__ goes through torch.compile
    return model


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction, as transformers shifts them: position t predicts token t+1."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_nll(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_nll(model, input_ids, labels, attention_mask=None, chunks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, label tokens), the head applied chunk by chunk (each chunk recomputed in
    backward): transformers' loss is sum / tokens, here without the (tokens x vocab) logits at once."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    target = _shifted(labels)
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.chunk(chunks), target.chunk(chunks)):
        total = total + checkpoint(_chunk_nll, lm.lm_head, h, t, use_reentrant=False)
    return total, (target != IGNORE_INDEX).sum()


def chunked_causal_lm_loss(model, input_ids, labels, attention_mask=None, chunks: int = 8,
                           num_items=None) -> torch.Tensor:
    """Mean next-token NLL over label tokens: the value of transformers' own loss. num_items: divide by it
    instead, as transformers does when the Trainer counted the label tokens of a whole optimizer step
    (gradient accumulation)."""
    total, n = chunked_nll(model, input_ids, labels, attention_mask, chunks)
    denom = n.clamp(min=1) if num_items is None else num_items
    return total / (denom.to(total.device) if torch.is_tensor(denom) else denom)


OFFLOAD_MIN_BYTES = 2**20  # smaller saved tensors (RoPE tables, masks, norms' statistics) stay: a copy each, ~nothing freed
_SIDE_STREAMS = {}  # device -> (out stream, back stream), made once


def _side_streams(device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = (torch.cuda.Stream(device=device), torch.cuda.Stream(device=device))
    return _SIDE_STREAMS[device]


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one: it stays in device memory anyway, so a copy would free nothing."""
    return isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors to pinned host memory with the copies overlapping compute (offload_activations on a GPU).

    torch's save_on_cpu copies each saved tensor out, and back in backward, on the compute stream, so every copy
    waits for the kernels before it and holds up those after it. Here (the idea of Unsloth's offloaded
    checkpointing and of torchtune's OffloadActivations, written here because neither library is a dependency
    of this study): out, a side stream copies the tensor once the compute stream has made it (record_stream
    keeps its memory from being reused before the copy has read it), while the forward pass goes on; back,
    backward uses saved tensors in about the reverse order they were saved, so when tensor i is needed, the
    highest unused one below it starts coming back on a second side stream (double buffering: at most one
    tensor on its way, one extra in device memory) and the compute stream waits only on events. Parameters and
    views of them (in device memory anyway) and tensors under min_bytes are kept as they are. Each forward pass
    gets its own instance (offload_context makes one per micro-batch); its hooks live as long as its graph.

    On a CPU the same bookkeeping runs with plain copies and no streams (tests/test_levers.py checks that
    gradients are bit-identical with and without it); the lever uses torch's save_on_cpu there."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES):
        self.min_bytes = min_bytes
        self.saved = {}  # index -> (host tensor, event its copy-out records, device)
        self.coming = {}  # index -> (device tensor on its way back, event its copy-in records)
        self.waiting = set()  # indices neither used nor on their way back yet
        super().__init__(self._pack, self._unpack)

    @torch.no_grad()
    def _pack(self, t: torch.Tensor):
        if _is_parameter(t) or t.is_sparse or t.numel() * t.element_size() < self.min_bytes:
            return (None, t)
        i = len(self.saved)
        self.waiting.add(i)
        if t.device.type != "cuda":
            self.saved[i] = (t.detach().clone(), None, t.device)
            return (i, None)
        out, _ = _side_streams(t.device)
        out.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is read
        with torch.cuda.stream(out):
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(out)
        t.record_stream(out)  # its device memory is not handed out again before the copy has read it
        self.saved[i] = (host, done, t.device)
        return (i, None)

    @torch.no_grad()
    def _send_back(self, i: int) -> None:
        host, done, device = self.saved[i]
        if done is None:
            self.coming[i] = (host.clone(), None)
            return
        _, back = _side_streams(device)
        with torch.cuda.stream(back):
            back.wait_event(done)
            t = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(back)
        self.coming[i] = (t, ready)

    @torch.no_grad()
    def _unpack(self, packed):
        i, t = packed
        if i is None:
            return t
        if i not in self.coming:  # not sent ahead (or already used once: a graph kept for a second backward)
            self._send_back(i)
        t, ready = self.coming.pop(i)
        if ready is not None:
            main = torch.cuda.current_stream(t.device)
            main.wait_event(ready)
            t.record_stream(main)  # made on the side stream, used and freed on this one
        self.waiting.discard(i)
        if not self.coming and self.waiting:  # one on its way at a time: the next one backward is likely to need
            below = [j for j in self.waiting if j < i]
            nxt = max(below) if below else max(self.waiting)
            self.waiting.discard(nxt)
            self._send_back(nxt)
        return t


def offload_context(cfg: dict, on_gpu: bool):
    """Where the forward pass runs: saved tensors to pinned host memory when offload_activations is on."""
    if cfg.get("offload_activations"):
        return HostOffload() if on_gpu else torch.autograd.graph.save_on_cpu(pin_memory=False)
    return contextlib.nullcontext()


def training_loss(model, batch: dict, cfg: dict, on_gpu: bool, num_items=None) -> torch.Tensor:
    """The loss of one micro-batch with the run's levers (the forward pass only; backward is the caller's)."""
    with offload_context(cfg, on_gpu):
        if cfg.get("chunked_loss"):
            return chunked_causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                          chunks=cfg["chunked_loss"], num_items=num_items)
        return model(**batch).loss


def lever_trainer_class():
    """A transformers Trainer whose loss goes through the levers (offload, chunked loss); built lazily so
    importing this module does not import transformers."""
    from transformers import Trainer

    class LeverTrainer(Trainer):
        def __init__(self, *a, levers: dict, on_gpu: bool, **kw):
            super().__init__(*a, **kw)
            self.levers, self.on_gpu = levers, on_gpu

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.levers.get("chunked_loss"):
                loss = training_loss(model, inputs, self.levers, self.on_gpu, num_items=num_items_in_batch)
                return (loss, None) if return_outputs else loss
            with offload_context(self.levers, self.on_gpu):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return LeverTrainer
