"""A checkpoint as one GGUF file, what llama.cpp and Ollama run (`lmspec export gguf`).

The checkpoint is taken as its Hugging Face family (runtime/hf: what `lmspec export hf` would write,
its tensors read from the checkpoint one at a time and converted on the way, so no copy of the
weights is written but the GGUF file) and converted the way llama.cpp's own convert_hf_to_gguf.py
converts such a model: the same architecture name, tensor names (the `gguf` package's table),
metadata keys, the q/k row order its rotary kernel wants, the same choice of which tensors stay
float32, and the byte-level BPE tokenizer with its merges, special tokens and chat template.

llama.cpp's loader for an architecture reads a fixed set of tensors and ignores config options it
does not know, so a spec that would load but compute something else is refused before the file
exists, naming the option: a sliding window, an activation, a bias the loader does not read or
needs, a rotary scaling, a mixture of experts.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmspec.runtime.atomic import failures_as_write_errors, install_file, scratch_directory
from lmspec.runtime.errors import GGUFError, UsageError

if TYPE_CHECKING:
    from lmspec.runtime.hf.convert import HFExport

GGUF_TYPES = ("f32", "f16", "q8_0")
_CHARACTER_LEVEL = "its tokenizer is character-level; a GGUF file holds a BPE tokenizer (train with --tokenizer)"
REQUIRED, OPTIONAL = "required", "optional"

# The tensors each loader reads (llama.cpp's src/models/<arch>.cpp), by name within a block.
_LLAMA_TENSORS = {
    "token_embd.weight": REQUIRED, "output_norm.weight": REQUIRED, "output.weight": OPTIONAL,
    "rope_freqs.weight": OPTIONAL, "attn_norm.weight": REQUIRED,
    "attn_q.weight": REQUIRED, "attn_k.weight": REQUIRED, "attn_v.weight": REQUIRED,
    "attn_q.bias": OPTIONAL, "attn_k.bias": OPTIONAL, "attn_v.bias": OPTIONAL,
    "attn_output.weight": REQUIRED, "attn_output.bias": OPTIONAL, "ffn_norm.weight": REQUIRED,
    "ffn_gate.weight": REQUIRED, "ffn_up.weight": REQUIRED, "ffn_down.weight": REQUIRED,
    "ffn_gate.bias": OPTIONAL, "ffn_up.bias": OPTIONAL, "ffn_down.bias": OPTIONAL,
}
_QWEN2_TENSORS = {
    "token_embd.weight": REQUIRED, "output_norm.weight": REQUIRED, "output.weight": OPTIONAL,
    "output.bias": OPTIONAL, "attn_norm.weight": REQUIRED,
    "attn_q.weight": REQUIRED, "attn_k.weight": REQUIRED, "attn_v.weight": REQUIRED,
    "attn_q.bias": OPTIONAL, "attn_k.bias": OPTIONAL, "attn_v.bias": OPTIONAL,
    "attn_output.weight": REQUIRED, "ffn_norm.weight": REQUIRED,
    "ffn_gate.weight": REQUIRED, "ffn_up.weight": REQUIRED, "ffn_down.weight": REQUIRED,
}
_QWEN3_TENSORS = {**{k: v for k, v in _QWEN2_TENSORS.items() if k != "output.bias"},
                  "attn_q_norm.weight": REQUIRED, "attn_k_norm.weight": REQUIRED}
_GPT2_TENSORS = {
    "token_embd.weight": REQUIRED, "position_embd.weight": REQUIRED, "output_norm.weight": REQUIRED,
    "output_norm.bias": REQUIRED, "output.weight": OPTIONAL,
    **{f"{t}.{s}": REQUIRED for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
       for s in ("weight", "bias")},
}

# What in a spec gives a tensor, for a refusal that names it.
_SPEC_OPTION = {
    "attn_q.bias": "attention(bias=true)", "attn_k.bias": "attention(bias=true)",
    "attn_v.bias": "attention(bias=true)", "attn_qkv.bias": "attention(bias=true)",
    "attn_output.bias": "attention(out_bias=true)", "output.bias": "linear(bias=true) as the LM head",
    "ffn_gate.bias": "mlp(bias=true)", "ffn_up.bias": "mlp(bias=true)", "ffn_down.bias": "mlp(bias=true)",
    "attn_q_norm.weight": "attention(qk_norm=...)", "attn_k_norm.weight": "attention(qk_norm=...)",
    "attn_norm.bias": "layernorm with a bias", "ffn_norm.bias": "layernorm with a bias",
    "output_norm.bias": "layernorm with a bias", "position_embd.weight": "learned positions",
}


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face model_type becomes one of llama.cpp's architectures."""

    name: str  # llama.cpp's (general.architecture)
    tensors: dict[str, str]
    activations: tuple[str, ...]  # the config's activation values this loader computes
    activation_key: str = "hidden_act"
    permute_qk: bool = False  # llama.cpp's LLAMA rotates adjacent pairs; Hugging Face rotates halves
    transposed: tuple[str, ...] = ()  # Hugging Face names stored [in, out] (GPT-2's Conv1D)
    rope_scalings: tuple[str, ...] = ("default",)
    keys: dict[str, str] = field(default_factory=dict)  # metadata key (without the arch) -> config key


_DECODER_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
                 "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
                 "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
                 "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_LLAMA = Architecture("llama", _LLAMA_TENSORS, ("silu",), permute_qk=True, rope_scalings=("default", "llama3"),
                      keys=_DECODER_KEYS)
ARCHITECTURES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,  # llama.cpp converts MistralForCausalLM as LLAMA
    "qwen2": Architecture("qwen2", _QWEN2_TENSORS, ("silu",), keys=_DECODER_KEYS),
    "qwen3": Architecture("qwen3", _QWEN3_TENSORS, ("silu",), keys=_DECODER_KEYS),
    "gpt2": Architecture("gpt2", _GPT2_TENSORS, ("gelu_new", "gelu_pytorch_tanh"), "activation_function",
                         transposed=(".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                                     ".mlp.c_proj.weight"),
                         keys={"context_length": "n_positions", "embedding_length": "n_embd",
                               "block_count": "n_layer", "attention.head_count": "n_head",
                               "attention.layer_norm_epsilon": "layer_norm_epsilon"}),
}

# Hugging Face pre-tokenizers and the name llama.cpp gives each (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_*).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def gguf_output_path(out: str) -> Path:
    """`-o model.gguf` names the file; `-o DIR` means DIR/model.gguf."""
    path = Path(out)
    return path if path.suffix == ".gguf" else path / "model.gguf"


def export_gguf(checkpoint: str, out: str, gguf_type: str = "f16", log=print) -> Path:
    """Write `checkpoint` as a GGUF file at `out` (f32, f16 or q8_0); returns its path. Nothing is
    written at `out` unless llama.cpp can run the model as the spec computes it."""
    from lmspec.runtime.hf.convert import plan_hf_export

    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--type {gguf_type}: one of {', '.join(GGUF_TYPES)}")
    destination = gguf_output_path(out)
    export = plan_hf_export(checkpoint, log=lambda *_: None)  # reads no tensor
    arch = _refuse_early(export)
    with failures_as_write_errors(destination), scratch_directory(destination.parent, "gguf") as work:
        export.write_files(work)  # config.json and the tokenizer's files, which gguf.SpecialVocab reads
        written = work / destination.name
        summary = gguf_from_hf_export(export, arch, work, written, gguf_type)
        install_file(written, destination)
    log(f"wrote {destination} ({destination.stat().st_size / 2**20:.1f} MiB): llama.cpp architecture "
        f"{summary['architecture']}, {summary['tensors']} tensors ({summary['types']}), "
        f"tokenizer {summary['pre']} with {summary['vocab']:,} tokens")
    return destination


def _refuse_early(export: HFExport) -> Architecture:
    """llama.cpp's architecture for the model, once its config.json (computed, not written) and its
    tokenizer show nothing llama.cpp would refuse or misread: a refusal writes nothing."""
    arch = _architecture(export.model_type, export.config)
    _refuse_what_llama_cpp_ignores(arch, export.config)
    if "tokenizer.json" not in export.files:  # no Hugging Face form: a character-level vocabulary
        raise GGUFError(_CHARACTER_LEVEL)
    return arch


def gguf_from_hf_export(export: HFExport, arch: Architecture, files: Path, out: Path, gguf_type: str) -> dict:
    """Convert `export`, refused by nothing in _refuse_early (its files written in `files`), into one
    GGUF file `out`, one tensor at a time; returns a summary for the log."""
    import gguf
    import numpy as np

    config = export.config
    tokenizer = _vocabulary(files, config)

    layers = config.get(arch.keys["block_count"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], layers)
    plan = []  # (gguf name, hf name or None for rope_freqs, shape), in the order export.tensors() gives them
    for hf_name, _, shape in export.entries:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"{hf_name}: no llama.cpp {arch.name} tensor takes this Hugging Face tensor")
        plan.append((gguf_name, hf_name, tuple(shape)[::-1] if hf_name.endswith(arch.transposed) else tuple(shape)))
    rope_freqs = _llama3_rope_factors(config) if "llama3" in arch.rope_scalings else None
    if rope_freqs is not None:
        plan.append(("rope_freqs.weight", None, rope_freqs.shape))
    _check_tensors(arch, [name for name, _, _ in plan], layers)

    file_type, quantized = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
                            "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
                            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}[gguf_type]
    writer = gguf.GGUFWriter(str(out), arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(export.name)
    _add_hyperparameters(writer, arch, config)
    writer.add_file_type(file_type)
    if quantized not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, files, tokenizer)

    types = {}
    typed = []
    for gguf_name, hf_name, shape in plan:
        qtype = _tensor_type(gguf_name, shape, quantized)
        typed.append((gguf_name, hf_name, shape, qtype))
        types[qtype.name] = types.get(qtype.name, 0) + 1
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        tensors = export.tensors()
        for gguf_name, hf_name, _, qtype in typed:
            if hf_name is None:
                data = rope_freqs
            else:
                read, tensor = next(tensors)
                assert read == hf_name, (read, hf_name)  # the header's order is the order they are read in
                data = _llama_cpp_layout(arch, config, hf_name, tensor)
            writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype))
    finally:
        writer.close()
    return {"architecture": arch.name, "tensors": len(typed), "pre": tokenizer["pre"], "vocab": len(tokenizer["tokens"]),
            "types": ", ".join(f"{n} {t}" for t, n in sorted(types.items()))}


def _architecture(model_type: str | None, config: dict) -> Architecture:
    if config.get("num_experts") or config.get("num_local_experts"):
        raise GGUFError(f"op moe (a {model_type} mixture of experts): lmspec writes GGUF for dense models "
                        f"({', '.join(ARCHITECTURES)}); `lmspec export hf` and llama.cpp's "
                        f"convert_hf_to_gguf.py convert the families it knows")
    if model_type not in ARCHITECTURES:
        raise GGUFError(f"a {model_type} model: lmspec writes GGUF for {', '.join(ARCHITECTURES)}; for another "
                        f"family llama.cpp knows, `lmspec export hf` and then llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def _refuse_what_llama_cpp_ignores(arch: Architecture, config: dict) -> None:
    """Options config.json states that this llama.cpp loader never reads, so it would compute
    something else than the spec."""
    act = config.get(arch.activation_key, arch.activations[0])
    if act not in arch.activations:
        raise GGUFError(f"mlp act ({arch.activation_key} = {act!r}): llama.cpp's {arch.name} computes "
                        f"{' or '.join(arch.activations)}")
    window = config.get("sliding_window")
    if window is not None and config.get("use_sliding_window", True):
        raise GGUFError(f"attention window={window}: llama.cpp's {arch.name} attends over the whole context")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in arch.rope_scalings:
        raise GGUFError(f"attention rope_scaling={rope_type!r}: llama.cpp's {arch.name} does not scale "
                        f"rotary frequencies that way")


def _check_tensors(arch: Architecture, names: list[str], layers: int) -> None:
    """Every tensor is one the loader reads, and every tensor it needs is there (llama.cpp refuses a
    file with a tensor too many)."""
    kinds = {re.sub(r"^blk\.\d+\.", "", n) for n in names}
    for kind in sorted(kinds):
        if kind not in arch.tensors:
            option = _SPEC_OPTION.get(kind, kind)
            raise GGUFError(f"{option}: llama.cpp's {arch.name} has no {kind} tensor, so it cannot run this spec")
    for kind, need in arch.tensors.items():
        if need == REQUIRED and kind not in kinds:
            option = _SPEC_OPTION.get(kind, kind)
            missing = "bias=false" if kind.endswith(".bias") else f"no {option}"
            raise GGUFError(f"{missing}: llama.cpp's {arch.name} needs {kind} ({option}) in every layer")


def _tensor_type(name: str, shape: tuple[int, ...], wanted):
    """llama.cpp's converter's rule: vectors, norms and learned positions stay float32; a matrix whose
    rows do not split into quantisation blocks falls back to float16."""
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _llama_cpp_layout(arch: Architecture, config: dict, hf_name: str, tensor):
    """A Hugging Face tensor in the layout llama.cpp reads: Conv1D weights as [out, in]; for LLAMA,
    the q and k rows of each head reordered from halves to adjacent pairs (convert_hf_to_gguf's permute)."""
    tensor = tensor.float()
    if hf_name.endswith(arch.transposed):
        tensor = tensor.t()
    if arch.permute_qk:
        heads = config["num_attention_heads"]
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute(tensor, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, config.get("num_key_value_heads") or heads)
    return tensor.contiguous().numpy()


def _permute(tensor, heads: int):
    return (tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:])
            .swapaxes(1, 2).reshape(tensor.shape))


def _llama3_rope_factors(config: dict):
    """Llama 3's frequency scaling as llama.cpp's rope_freqs tensor (what each base frequency is divided
    by: the same scaling lmspec's attention applies), or None."""
    from lmspec.compiler.torch_modules import rope_frequencies

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    scaled = rope_frequencies(dim, theta, "llama3", rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0),
                              rope.get("high_freq_factor", 4.0), rope.get("original_max_position_embeddings", 8192))
    return (rope_frequencies(dim, theta) / scaled).numpy()


def _add_hyperparameters(writer, arch: Architecture, config: dict) -> None:
    for key, config_key in arch.keys.items():
        value = config.get(config_key)
        if value is None and key == "attention.head_count_kv":
            value = config.get("num_attention_heads")
        if value is None:
            continue
        full = f"{arch.name}.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))
    if arch.name == "gpt2":
        writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
        return
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta if theta is not None else config.get("rope_theta", 10000.0)))


def _vocabulary(hf_dir: Path, config: dict) -> dict:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) model: tokens by id, their types, and the
    pre-tokenizer's name; refused for any other kind of tokenizer."""
    import gguf

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(_CHARACTER_LEVEL)
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"its tokenizer is {model.get('type')} without byte-level decoding; lmspec writes "
                        f"GGUF with byte-level BPE tokenizers (GPT-2's, Llama 3's, Qwen's)")
    pre = _pre_tokenizer(tok.get("pre_tokenizer"))
    vocab_size = config.get("vocab_size") or 0
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update((i, a["content"]) for i, a in added.items())
    vocab_size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    return {"tokens": tokens, "types": types, "pre": pre}


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, or a refusal."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and len(parts) == 2:
            pattern = (splits[0].get("pattern") or {}).get("Regex")
            if pattern in _PRE_TOKENIZERS:
                return _PRE_TOKENIZERS[pattern]
    raise GGUFError("its tokenizer splits text in a way llama.cpp has no name for (it knows GPT-2's, Llama 3's "
                    "and Qwen's byte-level pre-tokenizers)")


def _add_tokenizer(writer, hf_dir: Path, tokenizer: dict) -> None:
    """Tokens, merges, special tokens and the chat template; no BOS or EOS added to a prompt, as
    lmspec's tokenizer adds none."""
    import gguf

    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokenizer["tokens"]))
    if "eos" in special.special_token_ids:
        special.special_token_ids.setdefault("bos", special.special_token_ids["eos"])  # as GPT-2's
    special.add_special_token = {"bos": False, "eos": False}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    special.add_to_gguf(writer, quiet=True)
