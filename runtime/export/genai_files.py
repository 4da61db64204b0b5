"""What onnxruntime-genai needs beside an exported model to run it as it is: genai_config.json (the
decoder's inputs and outputs, its shape, greedy search defaults) and the tokenizer files
(tokenizer.json, tokenizer_config.json), or the reason this bundle cannot have them.

genai reads a directory, so the files are written for an export to one (`-o DIR`). Its generic
decoder type, "llama", runs any decoder-only graph in Optimum's layout, which a plain export has: a
cache that grows by concatenation (`past_present_share_buffer` false), and a --fused-attention one,
whose cache is one buffer per layer written in place (`past_present_share_buffer` true, the layout
genai's own models have). What it cannot run is said at export time instead of writing a config
that fails later: a character-level tokenizer (genai's tokenizer reads Hugging Face tokenizer files),
layers whose head counts or sizes differ, a sliding-window layer's bounded cache, a classifier.

The tokenizer files are Hugging Face's, and Optimum reads the same ones (runtime/export/optimum_files.py):
`tokenizer_files` writes them for both, with the checkpoint's chat template in tokenizer_config.json.
"""
from __future__ import annotations

import json

GENAI_CONFIG = "genai_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def decoder_refusal(kind: str, tokenizer, cache: dict | None, heads: list[int], reader: str) -> str | None:
    """Why a runtime that reads Optimum's decoder layout and Hugging Face tokenizer files (`reader`:
    "genai", "Optimum") cannot run this bundle as it is, or None when nothing in the layout stops it."""
    if kind != "language_model":
        return "a classifier is not a text generator"
    if getattr(tokenizer, "kind", None) != "hf":
        return f"its tokenizer is character-level; {reader} reads Hugging Face tokenizer files (train with --tokenizer)"
    if not cache:
        return "its attention is written by hand and has no KV cache"
    if any(cache.get("kept") or []):
        return f"its sliding-window layers keep a bounded cache, which {reader}'s decoder does not track"
    if len(set(cache["kv_heads"])) > 1 or len(set(cache["head_dim"])) > 1 or len(set(heads)) > 1:
        return "its layers differ in head counts or head size"
    return None


def genai_refusal(kind: str, tokenizer, cache: dict | None, heads: list[int]) -> str | None:
    """Why onnxruntime-genai cannot run this bundle as it is, or None when it can."""
    return decoder_refusal(kind, tokenizer, cache, heads, "genai")


def genai_files(meta: dict, heads: int) -> dict[str, str]:
    """{genai_config.json: its text} for a bundle genai_refusal accepts; the tokenizer files beside it
    are `tokenizer_files`'."""
    cache, context = meta["cache"], meta["context"]
    eos = meta["eot_id"] if meta["eot_id"] is not None else 0
    head_dim, kv_heads = cache["head_dim"][0], cache["kv_heads"][0]
    config = {
        "model": {
            "type": "llama",  # genai's generic decoder: Optimum's inputs and outputs, any architecture behind them
            "context_length": context,
            "vocab_size": meta["vocab_size"],
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": meta["file"],
                "head_size": head_dim,
                "hidden_size": heads * head_dim,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": cache["layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {  # greedy, as `lmspec generate --temperature 0`; callers set their own
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
            "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
            # --fused-attention: one buffer per layer that the kernel updates in place, genai's own layout
            "past_present_share_buffer": cache.get("buffer") == "shared",
        },
    }
    return {GENAI_CONFIG: json.dumps(config, indent=1) + "\n"}


def tokenizer_files(tokenizer, context: int | None, eot_id: int | None, chat_template: dict | None) -> dict[str, str]:
    """{file name: text} of tokenizer.json and tokenizer_config.json for a Hugging Face tokenizer, the
    same files for genai and Optimum: transformers' fast tokenizer over tokenizer.json as it is (no
    tokens added, so it encodes as lmspec does), the end-of-text token as its special tokens, and the
    checkpoint's chat template (`chat_template`, its record) for apply_chat_template and genai."""
    from lmspec.runtime.hf.chat_files import files_with_chat_template

    special = tokenizer.tokenizer.id_to_token(eot_id) if eot_id is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}  # no token_type_ids: generate(**encoded) takes it
    if context is not None:
        config["model_max_length"] = context
    if special is not None:
        config |= {"bos_token": special, "eos_token": special, "unk_token": special}
    files = {TOKENIZER_JSON: tokenizer.tokenizer.to_str(), TOKENIZER_CONFIG: json.dumps(config, indent=1) + "\n"}
    return files_with_chat_template(files, chat_template)
