"""Corpus -> documents -> disjoint train/eval split by document -> fixed-length token blocks."""
import functools
import json
import random
from pathlib import Path

import torch

DEFAULT_CORPUS = "pydoc"  # the Python reference topics every CPython ships (pydoc_data.topics)
# Uniform random token ids, for synthetic (random-weight) models: their cost depends on shapes, not text.
from helpers.records.registry import RANDOM_CORPUS  # noqa: E402 - the name, defined once (torch-free)
from helpers.records.registry import SYNTHETIC_EVAL_BLOCKS  # noqa: E402,F401 - eval blocks of a random-tokens run with eval_blocks 0


def check_corpus_name(corpus: str) -> None:
    """Refuse a corpus that is neither built in, a local .txt/.jsonl, nor a hub dataset id."""
    from helpers.training.models import looks_like_hub_id

    path = Path(corpus).expanduser()
    if corpus in (DEFAULT_CORPUS, RANDOM_CORPUS) or looks_like_hub_id(corpus.split(":")[0]):
        return
    if path.suffix in (".txt", ".jsonl") and path.is_file():
        return
    why = "no such file" if path.suffix in (".txt", ".jsonl") else "not a known corpus"
    raise ValueError(
        f"corpus={corpus!r} is {why}: use {DEFAULT_CORPUS!r}, an existing local .txt or .jsonl file, "
        f"a Hugging Face dataset id ('owner/name', optionally ':config'), or {RANDOM_CORPUS!r} (synthetic models only)"
    )


MIN_DOCUMENTS = 2  # the split holds out whole documents: at least one for training and one for evaluation
TXT_RULE = "a .txt corpus is UTF-8 text whose documents are separated by a blank line"
JSONL_RULE = 'a .jsonl corpus holds one JSON object with a "text" field per line'


def _read_local(path: Path) -> list[tuple[str, str]]:
    """Documents of a local .txt / .jsonl file; a file that is not such text is refused naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        rule = TXT_RULE if path.suffix == ".txt" else JSONL_RULE
        raise ValueError(f"corpus file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}; a compressed or binary file?): {rule}") from None
    except OSError as e:
        raise ValueError(f"corpus file {path} cannot be read ({e.strerror})") from None
    if path.suffix == ".txt":
        chunks = [c.strip() for c in text.split("\n\n")]
        return [(f"{path.name}:{i}", c) for i, c in enumerate(chunks) if c]
    docs = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {i + 1}: expected a JSON object with a 'text' field ({e})") from e
            if not isinstance(doc, str):
                raise ValueError(f"{path} line {i + 1}: 'text' is a {type(doc).__name__}, expected a string")
            if doc.strip():
                docs.append((f"{path.name}:{i}", doc))
    return docs


@functools.lru_cache(maxsize=8)
def _local_document_count(path: Path, size: int, mtime_ns: int) -> int:
    return len(_read_local(path))  # size and mtime key the cache: an edited file is read again


def check_corpus(corpus: str) -> None:
    """check_corpus_name, and a local file is read: UTF-8 text with at least two documents, or refused naming it.

    A hub dataset is not fetched here (no network before a run); the run refuses it if it has too few."""
    check_corpus_name(corpus)
    path = Path(corpus).expanduser()
    if path.suffix not in (".txt", ".jsonl") or not path.is_file():
        return
    st = path.stat()
    n = _local_document_count(path.resolve(), st.st_size, st.st_mtime_ns)
    if n < MIN_DOCUMENTS:
        rule = TXT_RULE if path.suffix == ".txt" else JSONL_RULE
        raise ValueError(f"corpus file {path} has {n} document(s); the train/eval split needs at least "
                         f"{MIN_DOCUMENTS}: {rule}")


def load_documents(corpus: str) -> list[tuple[str, str]]:
    """Return [(doc_id, text)], in a stable order. Documents are the unit of the train/eval split.

    pydoc: one document per topic. .txt: documents separated by a blank line. .jsonl: one per line,
    its "text" field. Hub dataset 'owner/name[:config]': the "text" column of its train split.
    """
    check_corpus_name(corpus)
    if corpus == DEFAULT_CORPUS:
        from pydoc_data.topics import topics

        return sorted(topics.items())
    path = Path(corpus).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        return _read_local(path)
    import datasets

    name, _, config = corpus.partition(":")
    ds = datasets.load_dataset(name, config or None, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {corpus!r} has no 'text' column (columns: {ds.column_names})")
    return [(f"{name}:{i}", t) for i, t in enumerate(ds["text"]) if t and t.strip()]


def split_documents(docs, eval_fraction: float = 0.1, split_seed: int = 1234):
    """Deterministic split by document: shuffle ids with a fixed seed, hold out a fraction.

    The seed is separate from the training seed so every run of a sweep sees the same eval split.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be between 0 and 1 (exclusive)")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    ids = sorted(d for d, _ in docs)
    random.Random(split_seed).shuffle(ids)
    n_eval = max(1, round(len(ids) * eval_fraction))
    held_out = set(ids[:n_eval])
    train = [(d, t) for d, t in docs if d not in held_out]
    evals = [(d, t) for d, t in docs if d in held_out]
    return train, evals


def tokenize_blocks(docs, tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into [n_blocks, seq_len] token ids.

    The ragged tail shorter than seq_len is dropped, so every block is full and carries seq_len-1
    loss tokens (labels are the inputs shifted by one inside the model).
    """
    ids = []
    for _, text in docs:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def random_blocks(n_blocks: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids: for synthetic (random-init) models, whose cost does not depend on text."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, seq_len), generator=g)


def prepare(config: dict, tokenizer, run: dict | None = None):
    """The notebook's data step: documents -> split -> (train_blocks, eval_blocks), counts into run.

    corpus 'random-tokens' (synthetic models): exactly the blocks the run consumes, uniform over the
    model's vocabulary; train blocks follow the run's seed, eval blocks a fixed one.
    """
    if config["corpus"] == RANDOM_CORPUS:
        from helpers.training.models import synthetic_vocab_size

        vocab = synthetic_vocab_size(config["model"])
        # blocks per optimizer step: batch_size per process, num_gpus processes (helpers.sharded), grad_accum
        n_train = config["max_steps"] * config["batch_size"] * config["grad_accum"] * config.get("num_gpus", 1)
        train = random_blocks(n_train, config["seq_len"], vocab, seed=config["seed"])
        evals = random_blocks(config["eval_blocks"] or SYNTHETIC_EVAL_BLOCKS, config["seq_len"], vocab, seed=1234)
        if run is not None:
            run["metrics"].update(train_docs=None, eval_docs=None, train_blocks=len(train), eval_blocks_scored=len(evals))
        return train, evals
    docs = load_documents(config["corpus"])
    train_docs, eval_docs = split_documents(docs, config["eval_fraction"])
    train = tokenize_blocks(train_docs, tokenizer, config["seq_len"])
    evals = tokenize_blocks(eval_docs, tokenizer, config["seq_len"])
    if config["eval_blocks"]:
        evals = evals[: config["eval_blocks"]]
    if run is not None:
        run["metrics"].update(train_docs=len(train_docs), eval_docs=len(eval_docs),
                              train_blocks=len(train), eval_blocks_scored=len(evals))
    return train, evals
