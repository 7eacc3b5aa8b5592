"""A run's parameters as records name them, without torch: the run id derived from them, and each value checked
against the type the training notebook declares. helpers.runs validates the rest (values, this machine);
the sweep and the benchmarks derive ids from here.
"""
import hashlib
import json
from pathlib import Path

from helpers.records.registry import ADDED_LATER

# Parameters that say where results go, not what is measured: left out of the run id.
NOT_IN_ID = ("output_dir", "run_id")
# Parameters added after the first runs were recorded (registry.ADDED_LATER) are in a run id only when they differ
# from what those runs used, so the runs recorded before them keep their ids: off-by-default ones while off (any
# false value), the others (stack 'hf', num_gpus 1) while at their default
OFF_NOT_IN_ID = tuple(k for k, v in ADDED_LATER.items() if not v)
DEFAULT_NOT_IN_ID = {k: v for k, v in ADDED_LATER.items() if v}


def type_problem(name: str, value, want: type) -> str | None:
    """Why `value` is not of the parameter's declared type (None if it is). An int is a fine float; a bool
    is no int. papermill's `-p learning_rate abc` arrives as the str 'abc' and is refused here."""
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True  # 16 is a fine float
    if ok:
        return None
    return f"{name}={value!r} is a {type(value).__name__}, the notebook expects {want.__name__}"


def check_types(config: dict, types: dict) -> None:
    """Every key a parameter of the notebook ({name: type}, e.g. its parameters cell's __annotations__), every
    parameter present, every value of its type."""
    unknown = sorted(set(config) - set(types))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; the notebook's parameters are {sorted(types)}")
    for name, want in types.items():
        if name not in config:
            raise ValueError(f"{name} has no value (None is not a value): the notebook expects a {want.__name__}")
        problem = type_problem(name, config[name], want)
        if problem:
            raise ValueError(problem)


def run_id(config: dict) -> str:
    """Readable and derived from the parameters: the same config always gets the same id."""
    # a parameter added later is not in the id while it is off, so runs recorded before it existed keep their ids
    key = {k: v for k, v in sorted(config.items()) if k not in NOT_IN_ID and not (k in OFF_NOT_IN_ID and not v)
           and not (k in DEFAULT_NOT_IN_ID and v == DEFAULT_NOT_IN_ID[k] and type(v) is type(DEFAULT_NOT_IN_ID[k]))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    name = Path(str(config["model"])).name.replace("/", "_")
    stack = "" if config.get("stack", "hf") == "hf" else f"-{config['stack']}"
    return f"{name}-{config['quant']}{stack}-r{config['lora_r']}-s{config['seq_len']}-seed{config['seed']}-{digest}"
