"""A tiny Llama with its own word-level tokenizer, standing in for a converted pretrained model (SmolLM2)."""

from __future__ import annotations

import torch

from superblock.gguf import PROMPTS

WORDS = sorted({w for p in PROMPTS for w in p.replace(",", " ").replace("(", " ").replace(")", " ").split()})


def tiny_llama(layers: int = 2) -> tuple[torch.nn.Module, object]:
    """A `layers`-layer Llama with tied embeddings (as SmolLM2) and a word-level tokenizer that covers the prompts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), tokenizer
