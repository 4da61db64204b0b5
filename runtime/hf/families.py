"""Hugging Face model families as data: parameter-name tables, config.json -> hyper-parameter
tables, the config values a family's specs assume, and spec templates for `--emit-spec`.

A PARAMETER TABLE is a tuple of rows `(lmspec name, source)`. The lmspec name may hold `{i}` (the
layer); the source is one of
    "hf.name"                  copied as it is
    T("hf.name")               transposed (GPT-2's Conv1D keeps weights as [in, out])
    Cat("a", "b", ..., parts=("heads", "kv_heads", "kv_heads"))
                               the HF tensors concatenated along dim 0; `parts` are the relative
                               sizes (expressions of the spec's hyper-parameters; equal if omitted)
    Stack(inner, fused="hf.name")
                               one slice per expert `{j}` along a new dim 0; `inner` is a name or a
                               Cat over names holding `{j}`; `fused` names the single 3-D tensor some
                               files hold instead (transformers' in-memory layout)
Every parameter the spec owns must match exactly one row; rows the spec lacks are skipped (the
Hugging Face tensors they name must then be absent, or the import says which ones were unused).

A HYPER TABLE is a tuple of `Hyper(name, keys, ...)`: the spec hyper-parameter `name` equals the
config value at the first of `keys` present (dotted paths into nested dicts). Only hyper-parameters
the spec has are compared. `Require(keys, allowed)` rows name config values a family's specs assume;
`OpArg(op, arg, keys, values)` rows tie an op argument used in the spec (an activation, an eps) to
a config value. The family's `tie` names the output head and the config key that says it is tied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


# ------------------------------------------------------------------------------------ table entries

@dataclass(frozen=True)
class T:
    """A transposed copy: HF keeps [in, out], lmspec [out, in]."""
    name: str


@dataclass(frozen=True)
class Cat:
    """HF tensors concatenated along dim 0, in this order."""
    names: tuple[str, ...]
    parts: tuple[str, ...] | None = None  # relative sizes as expressions of hyper-parameters

    def __init__(self, *names: str, parts: tuple[str, ...] | None = None):
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parts", parts)


@dataclass(frozen=True)
class Stack:
    """One HF tensor (or Cat of tensors) per expert `{j}`, stacked along a new dim 0."""
    inner: str | Cat
    fused: str | None = None


Source = "str | T | Cat | Stack"


@dataclass(frozen=True)
class When:
    """A condition on config.json: the value at the first present key equals `value`."""
    keys: tuple[str, ...]
    value: object
    default: object = None


@dataclass(frozen=True)
class Hyper:
    """Spec hyper-parameter `name` <- config.json at the first present key of `keys`.

    `default`: the value when no key is present (a constant, or a str expression of config keys
    such as "hidden_size // num_attention_heads"). `when`: only read when the condition holds
    (else the config has no value). `needed`: a value in the config that the spec must have a
    hyper-parameter for (rope scaling, a sliding window), because ignoring it changes the model."""
    name: str
    keys: tuple[str, ...] | str
    default: object = None
    when: When | None = None
    needed: bool = False

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys


@dataclass(frozen=True)
class Require:
    """A config value the family's specs assume (the op set has no hyper-parameter for it)."""
    keys: tuple[str, ...] | str
    allowed: tuple
    default: object = None

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys


@dataclass(frozen=True)
class OpArg:
    """An op argument of the spec that a config value must agree with: every `op` node's `arg`,
    mapped through `values` (spec value -> the config values meaning the same; the first is what
    export writes; None: the same value), equals the config value at `keys` (else `default`)."""
    op: str
    arg: str
    keys: tuple[str, ...] | str
    values: dict | None = None
    default: object = None

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values; the first is the default for export
    params: tuple[tuple[str, object], ...]
    hyper: tuple[Hyper, ...]
    requires: tuple[Require, ...] = ()
    op_args: tuple[OpArg, ...] = ()
    tie: tuple[str, str, bool] = ("lm_head.weight", "tie_word_embeddings", False)  # head, config key, default
    ignore: tuple[str, ...] = ()  # regexes of HF tensors that hold no parameter (old buffers)
    aliases: tuple[tuple[str, str], ...] = ()  # (prefix, replacement) also accepted on import
    base_config: dict = field(default_factory=dict)  # per model_type: what export writes besides the table's
    architectures: dict = field(default_factory=dict)  # model_type -> transformers class name


# ------------------------------------------------------------------------------------------- GPT-2

_H = "transformer.h.{i}."
GPT2_PARAMS = (
    ("wte.weight", "transformer.wte.weight"),
    ("wpe.weight", "transformer.wpe.weight"),
    ("block.{i}.ln.weight", _H + "ln_1.weight"),
    ("block.{i}.ln.bias", _H + "ln_1.bias"),
    ("block.{i}.attn.qkv.weight", T(_H + "attn.c_attn.weight")),
    ("block.{i}.attn.qkv.bias", _H + "attn.c_attn.bias"),
    ("block.{i}.attn.proj.weight", T(_H + "attn.c_proj.weight")),
    ("block.{i}.attn.proj.bias", _H + "attn.c_proj.bias"),
    ("block.{i}.ln_1.weight", _H + "ln_2.weight"),
    ("block.{i}.ln_1.bias", _H + "ln_2.bias"),
    ("block.{i}.mlp.fc.weight", T(_H + "mlp.c_fc.weight")),
    ("block.{i}.mlp.fc.bias", _H + "mlp.c_fc.bias"),
    ("block.{i}.mlp.proj.weight", T(_H + "mlp.c_proj.weight")),
    ("block.{i}.mlp.proj.bias", _H + "mlp.c_proj.bias"),
    ("ln_f.weight", "transformer.ln_f.weight"),
    ("ln_f.bias", "transformer.ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
)

GPT2_HYPER = (
    Hyper("vocab", "vocab_size"),
    Hyper("context", "n_positions"),
    Hyper("dim", "n_embd"),
    Hyper("heads", "n_head"),
    Hyper("layers", "n_layer"),
)

# spec activation -> transformers' ACT2FN names for the same function (the first is written on export)
_GPT2_ACTS = {"gelu_tanh": ("gelu_new", "gelu_pytorch_tanh"), "gelu": ("gelu",), "relu": ("relu",),
              "silu": ("silu", "swish")}
_LLAMA_ACTS = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new"), "gelu": ("gelu",),
               "relu": ("relu",)}

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    params=GPT2_PARAMS,
    hyper=GPT2_HYPER,
    requires=(
        Require("scale_attn_weights", (True,), True),
        Require("scale_attn_by_inverse_layer_idx", (False,), False),
    ),
    op_args=(
        OpArg("mlp", "act", "activation_function", _GPT2_ACTS, "gelu_new"),
        OpArg("layernorm", "eps", "layer_norm_epsilon", None, 1e-5),
    ),
    tie=("lm_head.weight", "tie_word_embeddings", True),
    ignore=(r"^(transformer\.)?h\.\d+\.attn\.(masked_)?bias$",),
    aliases=(("transformer.", ""),),  # some hub files (OpenAI's conversion) have no `transformer.` prefix
    base_config={"gpt2": {"n_inner": None}},
    architectures={"gpt2": "GPT2LMHeadModel"},
)


# ------------------------------------------------------------------- Llama, Mistral, Qwen2, Qwen3

_L = "model.layers.{i}."
_QKV_PARTS = ("heads", "kv_heads", "kv_heads")


def _qkv(kind: str) -> Cat:
    return Cat(*(f"{_L}self_attn.{p}_proj.{kind}" for p in "qkv"), parts=_QKV_PARTS)


LLAMA_COMMON = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("block.{i}.attn_norm.weight", _L + "input_layernorm.weight"),
    ("block.{i}.attn.qkv.weight", _qkv("weight")),
    ("block.{i}.attn.qkv.bias", _qkv("bias")),  # Qwen2 (and Llama with attention_bias)
    ("block.{i}.attn.proj.weight", _L + "self_attn.o_proj.weight"),
    ("block.{i}.attn.proj.bias", _L + "self_attn.o_proj.bias"),  # Llama with attention_bias
    ("block.{i}.mlp_norm.weight", _L + "post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),  # only an untied head
)
DENSE_MLP = (
    ("block.{i}.mlp.fc.weight", Cat(_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight")),
    ("block.{i}.mlp.fc.bias", Cat(_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias")),  # mlp_bias
    ("block.{i}.mlp.proj.weight", _L + "mlp.down_proj.weight"),
    ("block.{i}.mlp.proj.bias", _L + "mlp.down_proj.bias"),
)
QK_NORM = (
    ("block.{i}.attn.q_norm.weight", _L + "self_attn.q_norm.weight"),
    ("block.{i}.attn.k_norm.weight", _L + "self_attn.k_norm.weight"),
)
_E = _L + "mlp.experts."
MOE_MLP = (
    ("block.{i}.mlp.router.weight", _L + "mlp.gate.weight"),
    ("block.{i}.mlp.fc_weight", Stack(Cat(_E + "{j}.gate_proj.weight", _E + "{j}.up_proj.weight"),
                                      fused=_E + "gate_up_proj")),
    ("block.{i}.mlp.proj_weight", Stack(_E + "{j}.down_proj.weight", fused=_E + "down_proj")),
)

_ROPE_TYPE = ("rope_parameters.rope_type", "rope_scaling.rope_type", "rope_scaling.type")
_LLAMA3 = When(_ROPE_TYPE, "llama3", "default")

LLAMA_HYPER = (
    Hyper("vocab", "vocab_size"),
    Hyper("context", "max_position_embeddings"),
    Hyper("dim", "hidden_size"),
    Hyper("layers", "num_hidden_layers"),
    Hyper("heads", "num_attention_heads"),
    Hyper("kv_heads", "num_key_value_heads", default="num_attention_heads"),
    Hyper("head_dim", "head_dim", default="hidden_size // num_attention_heads"),
    Hyper("ffn", "intermediate_size"),
    Hyper("eps", "rms_norm_eps"),
    Hyper("tied", "tie_word_embeddings", default=False),  # the templates' head: tie=embed if tied else none
    # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x rope_theta + rope_scaling
    Hyper("theta", ("rope_parameters.rope_theta", "rope_theta"), default=10000.0),
    Hyper("rope_factor", ("rope_parameters.factor", "rope_scaling.factor"), when=_LLAMA3, needed=True),
    Hyper("rope_low", ("rope_parameters.low_freq_factor", "rope_scaling.low_freq_factor"), when=_LLAMA3,
          needed=True),
    Hyper("rope_high", ("rope_parameters.high_freq_factor", "rope_scaling.high_freq_factor"), when=_LLAMA3,
          needed=True),
    Hyper("rope_original", ("rope_parameters.original_max_position_embeddings",
                            "rope_scaling.original_max_position_embeddings"), when=_LLAMA3, needed=True),
    # Mistral has no use_sliding_window (a window applies when sliding_window is set); Qwen2/3 do.
    Hyper("window", "sliding_window", when=When(("use_sliding_window",), True, True), needed=True),
)
MOE_HYPER = tuple(h for h in LLAMA_HYPER if h.name != "ffn") + (
    Hyper("experts", ("num_experts", "num_local_experts")),  # transformers 5 writes num_local_experts
    Hyper("top_k", "num_experts_per_tok"),
    Hyper("moe_ffn", "moe_intermediate_size"),
    Hyper("norm_topk", "norm_topk_prob", default=False),
)

LLAMA_REQUIRES = (
    Require(_ROPE_TYPE, ("default", "llama3"), "default"),
)
LLAMA_OP_ARGS = (
    OpArg("mlp", "act", "hidden_act", _LLAMA_ACTS, "silu"),
    OpArg("moe", "act", "hidden_act", _LLAMA_ACTS, "silu"),
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    params=LLAMA_COMMON + DENSE_MLP,
    hyper=LLAMA_HYPER,
    requires=LLAMA_REQUIRES,
    op_args=LLAMA_OP_ARGS,
    ignore=(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
    base_config={"llama": {"rope_parameters": {"rope_type": "default"}},
                 "mistral": {"rope_parameters": {"rope_type": "default"}, "sliding_window": None},
                 "qwen2": {"rope_parameters": {"rope_type": "default"}, "use_sliding_window": False,
                           "sliding_window": None}},
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"},
)

QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    params=LLAMA_COMMON + QK_NORM + DENSE_MLP,
    hyper=LLAMA_HYPER,
    requires=LLAMA_REQUIRES,
    op_args=LLAMA_OP_ARGS,
    ignore=LLAMA.ignore,
    base_config={"qwen3": {"rope_parameters": {"rope_type": "default"}, "use_sliding_window": False,
                           "sliding_window": None}},
    architectures={"qwen3": "Qwen3ForCausalLM"},
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    params=LLAMA_COMMON + QK_NORM + MOE_MLP,
    hyper=MOE_HYPER,
    requires=LLAMA_REQUIRES + (
        Require("decoder_sparse_step", (1,), 1),  # every layer a mixture of experts
        Require("mlp_only_layers", ([],), []),
    ),
    op_args=LLAMA_OP_ARGS,
    ignore=LLAMA.ignore,
    base_config={"qwen3_moe": {"rope_parameters": {"rope_type": "default"}, "use_sliding_window": False,
                               "sliding_window": None, "decoder_sparse_step": 1, "mlp_only_layers": []}},
    architectures={"qwen3_moe": "Qwen3MoeForCausalLM"},
)

# In this order `export hf` tries the families on a checkpoint that was not imported.
FAMILIES = {f.name: f for f in (GPT2, LLAMA, QWEN3, QWEN3_MOE)}
MODEL_TYPES = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_for_model_type(model_type: str) -> Family | None:
    return MODEL_TYPES.get(model_type)


# -------------------------------------------------------------------------------- spec templates
# `lmspec import hf DIR --emit-spec FILE` writes the first template found under
# "<model_type>/<rope_type>", "<model_type>", "<family>/<rope_type>", "<family>" (rope_type from
# config.json's rope_parameters or rope_scaling, e.g. "llama/llama3"), with `{hyper}` replaced by
# the values from config.json (every Hyper of the family, plus `{name}`, the model's name made from
# the directory's, and `{source}`, the directory's name). Only `{identifier}` is replaced, so the
# braces of `model x {` and `repeat ... {` stay as they are. A template is one string per entry;
# the spec it gives is then checked against config.json like any other.

GPT2_TEMPLATE = """\
# {source}: GPT-2 (learned positions, pre-norm blocks, tanh GELU, head tied to the token embedding),
# written by `lmspec import hf --emit-spec` from its config.json.
model {name} {
  vocab = {vocab}; context = {context}; dim = {dim}; heads = {heads}; layers = {layers}; dropout = 0.0

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as wte + position(seq, context, dim) as wpe
  x = dropout(x, dropout)
  repeat layers as block {
    x = x + dropout(attention(layernorm(x), heads, causal=true), dropout)
    x = x + dropout(mlp(layernorm(x), 4 * dim, act=gelu_tanh), dropout)
  }
  logits = linear(layernorm(x) as ln_f, vocab, bias=false, tie=wte) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""


def _decoder_template(what: str, hyper: str, attention: str, feed_forward: str) -> str:
    """A Llama-style decoder (RMSNorm, rotary GQA attention, gated feed-forward) as a template;
    `hyper` adds hyper-parameters, `attention` attention options, `feed_forward` the mlp or moe call."""
    return f"""\
# {{source}}: {what}, written by `lmspec import hf --emit-spec` from its config.json.
model {{name}} {{
  vocab = {{vocab}}; context = {{context}}; dim = {{dim}}; layers = {{layers}}; heads = {{heads}}; kv_heads = {{kv_heads}}
  head_dim = {{head_dim}}; eps = {{eps}}; theta = {{theta}}; tied = {{tied}}{hyper}

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block {{
    x = x + attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads, head_dim=head_dim,
                      rope=true, rope_theta=theta{attention}) as attn
    x = x + {feed_forward} as mlp
  }}
  logits = linear(rmsnorm(x, eps) as norm, vocab, bias=false, tie=embed if tied else none) as lm_head
  output logits: f32[batch, seq, vocab]
}}
"""


_FFN = "\n  ffn = {ffn}"
_SWIGLU = "mlp(rmsnorm(x, eps) as mlp_norm, ffn, act=silu, gated=true, bias=false)"
_NO_BIAS = ", bias=false"
_QK_NORM = ", bias=false, qk_norm=true, qk_norm_eps=eps"

TEMPLATES: dict[str, str | None] = {
    "gpt2": GPT2_TEMPLATE,
    "llama": _decoder_template("Llama", _FFN, _NO_BIAS, _SWIGLU),
    "llama/llama3": _decoder_template(
        "Llama 3 (rotary positions with Llama-3 frequency scaling)",
        _FFN + "; rope_factor = {rope_factor}; rope_low = {rope_low}; rope_high = {rope_high}"
               "; rope_original = {rope_original}",
        _NO_BIAS + ',\n                      rope_scaling="llama3", rope_factor=rope_factor, rope_low=rope_low,'
                   "\n                      rope_high=rope_high, rope_original=rope_original",
        _SWIGLU),
    "mistral": _decoder_template("Mistral (sliding-window attention)", _FFN + "; window = {window}",
                                 _NO_BIAS + ", window=window", _SWIGLU),
    "qwen2": _decoder_template("Qwen2 (biases on q, k and v)", _FFN, ", bias=true, out_bias=false", _SWIGLU),
    "qwen3": _decoder_template("Qwen3 (QK-norm)", _FFN, _QK_NORM, _SWIGLU),
    "qwen3_moe": _decoder_template(
        "Qwen3-MoE (QK-norm, a mixture of experts in every layer)",
        "\n  experts = {experts}; top_k = {top_k}; moe_ffn = {moe_ffn}; norm_topk = {norm_topk}", _QK_NORM,
        "moe(rmsnorm(x, eps) as mlp_norm, experts, top_k, moe_ffn, act=silu, norm_topk=norm_topk)"),
}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_for(model_type: str, family: Family, rope_type: str | None = None) -> str | None:
    keys = [f"{model_type}/{rope_type}", model_type, f"{family.name}/{rope_type}", family.name]
    return next((TEMPLATES[k] for k in keys if TEMPLATES.get(k)), None)


def fill_template(template: str, values: dict[str, object]) -> tuple[str, list[str]]:
    """The template with `{name}` replaced by values; also the placeholders that had no value."""
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in values or values[key] is None:
            missing.append(key)
            return match.group(0)
        return spec_literal(values[key])

    return _PLACEHOLDER.sub(replace, template), missing


def spec_literal(value: object) -> str:
    """A hyper-parameter value as the spec language writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    return str(value)
