"""What Optimum's ORTModelForCausalLM needs beside an exported model to load it as it is: config.json (as
`lmspec export hf` writes it, with `use_cache`) and generation_config.json, or the reason this bundle
cannot have them.

Optimum reads the decoder layout a plain export has (input_ids, attention_mask, position_ids,
past_key_values.{i}.key/.value in; logits, present.{i}.key/.value out) and the same Hugging Face
tokenizer files as onnxruntime-genai (genai_files.tokenizer_files). From config.json it takes the
model_type and the cache's shape: the empty cache of a prompt is num_key_value_heads (for the model
types it lists, num_attention_heads for the others) by hidden_size / num_attention_heads (head_dim
for Gemma's), as optimum-onnx 0.1.0 sizes it. What it cannot load is said at export time: what genai
cannot run for the same reasons (genai_files.decoder_refusal), a spec no Hugging Face family's table
fits, and a cache of a shape config.json does not give Optimum.
"""
from __future__ import annotations

import json

OPTIMUM_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# The model types whose cache Optimum sizes with num_key_value_heads, and those whose head size it
# reads from head_dim (optimum/onnxruntime/modeling_decoder.py, optimum-onnx 0.1.0).
_KV_HEADS_READ = {"arcee", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss", "helium", "mistral",
                  "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3", "stablelm"}
_HEAD_DIM_READ = {"gemma", "gemma3_text", "gpt_oss", "nemotron"}


def optimum_refusal(kind: str, tokenizer, cache: dict | None, heads: list[int]) -> str | None:
    """Why Optimum cannot load this bundle whatever its config.json, or None when nothing in its layout
    stops it."""
    from lmspec.runtime.export.genai_files import decoder_refusal
    if cache and cache.get("buffer"):
        return "--fused-attention's shared buffer is not Optimum's layout (a cache that grows); export without it"
    return decoder_refusal(kind, tokenizer, cache, heads, "Optimum")


def optimum_files(meta: dict, checkpoint, graph) -> tuple[dict[str, str], str | None]:
    """({config.json and generation_config.json: their text}, None) for a bundle optimum_refusal
    accepts, the config as `lmspec export hf` writes it for `graph` (the exported model's); ({}, why)
    when no Hugging Face family fits the spec or Optimum would size its cache otherwise."""
    from lmspec.runtime.errors import UserError
    from lmspec.runtime.hf.config import hyper_from_config
    from lmspec.runtime.hf.convert import _hf_record, checkpoint_config

    try:
        family, model_type, config = checkpoint_config(checkpoint, graph, meta["eot_id"], dtype=meta["dtype"])
    except UserError as err:  # `export hf --model-type` names a family; `export` has no such option
        return {}, str(err).removesuffix("; name one with --model-type")
    why = _cache_shape_problem(model_type, {n: v for n, (v, _) in hyper_from_config(family, config).items()},
                               meta["cache"])
    if why is not None:
        return {}, why
    config = {**config, "use_cache": True}  # the export takes and returns the cache
    carried = ((_hf_record(checkpoint.path) or {}).get("files") or {}).get(GENERATION_CONFIG)
    return {OPTIMUM_CONFIG: json.dumps(config, indent=2) + "\n",
            GENERATION_CONFIG: carried if isinstance(carried, str) else generation_config(meta)}, None


def generation_config(meta: dict) -> str:
    """generation_config.json for a checkpoint that was not imported with one: greedy, as `lmspec
    generate --temperature 0`, up to the model's context, ending at its end-of-text token."""
    config: dict = {"do_sample": False}
    if meta["eot_id"] is not None:
        config |= {"bos_token_id": meta["eot_id"], "eos_token_id": meta["eot_id"], "pad_token_id": meta["eot_id"]}
    if meta["context"] is not None:
        config["max_length"] = meta["context"]
    return json.dumps(config, indent=2) + "\n"


def _cache_shape_problem(model_type: str, hyper: dict, cache: dict) -> str | None:
    """Where the empty cache Optimum makes from config.json differs from the one the export takes."""
    heads, dim = hyper.get("heads"), hyper.get("dim")
    if not isinstance(heads, int) or not isinstance(dim, int) or heads < 1:
        return "its config.json gives no hidden_size and num_attention_heads, which Optimum sizes the cache by"
    if model_type in _HEAD_DIM_READ:
        size, size_from = hyper.get("head_dim"), "head_dim"
    else:
        size, size_from = dim // heads, "hidden_size / num_attention_heads"
    kv, kv_from = ((hyper.get("kv_heads") or heads, "num_key_value_heads") if model_type in _KV_HEADS_READ
                   else (heads, "num_attention_heads"))
    if (kv, size) != (cache["kv_heads"][0], cache["head_dim"][0]):
        return (f"Optimum sizes a {model_type} cache as {kv} heads ({kv_from}) of {size} ({size_from}), but this "
                f"model's holds {cache['kv_heads'][0]} heads of {cache['head_dim'][0]}")
    return None
