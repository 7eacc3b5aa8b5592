import pytest
import torch

from helpers.training import data
from tests.conftest import tiny_tokenizer


def test_pydoc_split_is_disjoint_and_deterministic():
    docs = data.load_documents("pydoc")
    assert len(docs) > 50
    train, evals = data.split_documents(docs, 0.1)
    train_ids, eval_ids = {d for d, _ in train}, {d for d, _ in evals}
    assert train_ids.isdisjoint(eval_ids)
    assert train_ids | eval_ids == {d for d, _ in docs}
    assert len(eval_ids) == round(len(docs) * 0.1)
    # no eval text appears verbatim in training text
    train_text = "\n".join(t for _, t in train)
    assert not any(t in train_text for _, t in evals if len(t) > 200)
    again = data.split_documents(list(reversed(docs)), 0.1)
    assert {d for d, _ in again[1]} == eval_ids  # the input order does not matter


def test_split_does_not_depend_on_training_seed_but_on_split_seed():
    docs = [(f"d{i}", "x" * 10) for i in range(40)]
    a = {d for d, _ in data.split_documents(docs, 0.25, split_seed=1)[1]}
    b = {d for d, _ in data.split_documents(docs, 0.25, split_seed=2)[1]}
    assert a != b


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_refuses_bad_fraction(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_documents([("a", "x"), ("b", "y")], fraction)


def test_blocks_are_full_and_cross_documents_with_eos():
    tok = tiny_tokenizer()
    blocks = data.tokenize_blocks([("a", "hello"), ("b", "world!")], tok, 4)
    assert blocks.shape == (3, 4)  # 5 + 1 eos + 6 + 1 eos = 13 tokens -> 3 full blocks
    flat = blocks.flatten().tolist()
    assert flat[5] == tok.eos_token_id
    assert tok.decode(flat[:5]) == "hello"


def test_blocks_refuse_tiny_corpus():
    with pytest.raises(ValueError, match="seq_len=64"):
        data.tokenize_blocks([("a", "hi")], tiny_tokenizer(), 64)


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n\n\nthird")
    assert [t for _, t in data.load_documents(str(txt))] == ["first doc\nline two", "second doc", "third"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [t for _, t in data.load_documents(str(jl))] == ["a", "b"]
    jl.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):
        data.load_documents(str(jl))


def test_random_blocks_are_seeded():
    a = data.random_blocks(3, 8, 100, seed=1)
    assert torch.equal(a, data.random_blocks(3, 8, 100, seed=1))
    assert a.max() < 100
