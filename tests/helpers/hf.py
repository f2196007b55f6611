"""Tiny transformers architectures shared by the language-model tests: BERT, GPT-2 and Llama twins of a few
thousand parameters (config overrides for transformers.AutoConfig.for_model)."""

CONFIGS = {
    "bert": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}
