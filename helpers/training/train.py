"""Attach LoRA and train with the Hugging Face Trainer; QLoRA is LoRA plus one switch (`quant`)."""
import tempfile

import torch

from helpers.records.registry import upcasts_to_fp32  # noqa: F401 - decided in the torch-free registry; known from here

# Optimizers offered (HF TrainingArguments `optim` names). adamw_torch_fused: torch's single-kernel AdamW (a
# speed lever; the same update). The 8-bit and paged ones need bitsandbytes;
# paged = optimizer state in CUDA unified memory that can spill to the host under memory pressure.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def upcast_like_kbit(model):
    """peft's upcast for an unquantized base: every parameter that bitsandbytes would leave unquantized (norms,
    embeddings, the output head: all but the decoder's Linear weights) to float32, as prepare_model_for_kbit_training
    does to a quantized model's (it casts every 16-bit parameter, which on a 16-bit base would be all of them).
    Each 16-bit Linear then computes as bitsandbytes' Linear4bit does: its float32 input cast to the weight's dtype,
    its output cast back to float32, so the residual stream stays float32 outside autocast too (evaluation)."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    keep = {id(m.weight) for m in linears}
    for p in model.parameters():
        if id(p) not in keep and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    for m in linears:
        if m.weight.dtype in (torch.float16, torch.bfloat16):
            m.forward = _computing_in(m.forward, m.weight.dtype)
    return model


def _computing_in(forward, dtype):
    def cast_forward(x):
        return forward(x.to(dtype)).to(x.dtype)
    return cast_forward


def attach_lora(model, quant: str, lora_r: int, lora_alpha: int, lora_dropout: float,
                target_modules: str = "all-linear", gradient_checkpointing: bool = True, keep_16bit: bool = False,
                fp32_upcast: bool = False):
    """Freeze the base, add LoRA adapters, and set up gradient checkpointing the same way in both arms.

    Precision (upcasts_to_fp32): QLoRA goes through peft's prepare_model_for_kbit_training (float32 norms,
    embeddings and head) unless keep_16bit, which freezes and checkpoints the same way but leaves them in the
    compute dtype; quant none stays 16-bit unless fp32_upcast, which gives it the same upcast as QLoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    upcast = upcasts_to_fp32(quant, keep_16bit, fp32_upcast)
    if quant != "none" and upcast:
        # freezes the base, casts norms/embeddings to fp32, enables checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if upcast:
            upcast_like_kbit(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    cfg = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=targets,  # "all-linear" = every nn.Linear but the output head
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()  # from_pretrained returns eval mode, where checkpointing silently does nothing
    return model


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks as causal-LM examples: labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        x = self.blocks[i]
        return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}


def make_trainer(model, train_blocks: torch.Tensor, *, device: str, dtype: str, quant: str, max_steps: int,
                 batch_size: int, grad_accum: int, learning_rate: float, warmup_steps: int, optimizer: str,
                 seed: int, callbacks=(), progress: bool = True, output_dir: str | None = None, levers=None):
    """A Trainer set up for a fixed number of optimizer steps, no checkpoints, no reporting.

    levers (helpers.levers): with offload_activations or chunked_loss on, the loss goes through them; with
    both off it is transformers' own Trainer, the plain reference. Either way it counts each step's loss tokens
    for a StepTelemetry among the callbacks (counting)."""
    from transformers import Trainer, TrainingArguments

    from helpers.training.levers import lever_trainer_class

    on_gpu = str(device).startswith("cuda")
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="qlora-study-trainer-"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        optim=optimizer,
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,
        # mixed precision only on a GPU; on CPU the weights' own dtype (and bnb's compute dtype) rules
        bf16=on_gpu and dtype == "bfloat16",
        fp16=on_gpu and dtype == "float16",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if on_gpu:  # one process trains on one GPU (several: num_gpus > 1, FSDP, helpers/training/sharded.py). On a machine of
        # several the Trainer would wrap the model in DataParallel over all and multiply the batch by their number;
        # it sets _n_gpu to 1 itself for a model spread over GPUs. args.device first: it sets _n_gpu.
        _ = args.device
        args._n_gpu = 1
    kw = dict(model=model, args=args, train_dataset=BlockDataset(train_blocks), callbacks=list(callbacks))
    levers = levers or {}
    if levers.get("offload_activations") or levers.get("chunked_loss"):
        return counting(lever_trainer_class())(**kw, levers=levers, on_gpu=on_gpu)
    return counting(Trainer)(**kw)


def counting(trainer_class):
    """trainer_class that hands each optimizer step's micro-batches, as it fetches them (before on_step_begin), to
    its StepTelemetry callbacks, so a step's tokens are the loss tokens it held (an epoch's last batch holds
    fewer blocks). It only looks: the training is trainer_class's."""
    from helpers.training.telemetry import StepTelemetry

    class CountingTrainer(trainer_class):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, StepTelemetry):
                    cb.count_batches(batches)
            return batches, num_items

    CountingTrainer.__name__ = CountingTrainer.__qualname__ = f"Counting{trainer_class.__name__}"
    return CountingTrainer
