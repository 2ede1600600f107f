"""Tiny random-initialised causal LMs of real architectures, with a word-level tokenizer trained on the
job's own texts. Used by the quickstart (no network) and the tests (Llama, GPT-NeoX, OPT)."""
from __future__ import annotations

from pathlib import Path

# A minimal chat template (ChatML-like), so the chat format works with tiny models too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_tokenizer(texts: list[str], out_dir: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    from tokenizers.processors import TemplateProcessing

    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    arch: str, out_dir: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, seed: int = 0,
    init_std: float = 0.02,
):
    """Save a random `arch` model ("llama", "gpt_neox", "opt") and its tokenizer to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, OPTConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, out_dir)
    vocab = ((len(tok) + 63) // 64) * 64
    common = dict(initializer_range=init_std, vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **common)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=4096, **common)
    elif arch == "opt":
        config = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                           word_embed_proj_dim=hidden, max_position_embeddings=4096, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, gpt_neox or opt")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
