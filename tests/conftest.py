"""Fixtures: a tiny random-init Llama (and a character-level tokenizer) built in-process, no hub, no cache."""
import string

import pytest
import torch

VOCAB = ["<unk>", "<eos>"] + list(string.printable)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1,
               pad_token_id=1, bos_token_id=None)
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer folder: loads through the same path as any local model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def base_config(**kw):
    """The training notebook's defaults (read from its parameters cell), with overrides."""
    import papermill

    from helpers.sweeps.sweep import notebook_parameters

    cfg = {k: v["default"] for k, v in notebook_parameters().items()}
    cfg.update(kw)
    return cfg
