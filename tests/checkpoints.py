"""A tiny local checkpoint for tests that run the real ``kvpolicy`` entry point in a subprocess (which cannot be handed
a model object): a directory ``from_pretrained`` loads, built in a second, nothing downloaded."""

from __future__ import annotations

from pathlib import Path


def tiny_checkpoint(path: Path) -> Path:
    """A 2-layer random Llama (GQA) with a word-level tokenizer, saved like a local checkpoint."""
    import torch
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "def", "return", "the", "of", "a", "to", "in", "is", "and", "for", "=", "(", ")",
             ":", ",", ".", "self", "if", "not", "None", "import"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(64 - len(words))])}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
