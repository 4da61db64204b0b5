"""How lmspec's GPT-2 parameter names map onto the hand-written reference GPT's (tests/reference_gpt.py)."""
import re

_RULES = [
    (r"^wte\.", "transformer.wte."),
    (r"^wpe\.", "transformer.wpe."),
    (r"^ln_f\.", "transformer.ln_f."),
    (r"^block\.(\d+)\.ln\.", r"transformer.h.\1.ln_1."),
    (r"^block\.(\d+)\.ln_1\.", r"transformer.h.\1.ln_2."),
    (r"^block\.(\d+)\.attn\.qkv\.", r"transformer.h.\1.attn.c_attn."),
    (r"^block\.(\d+)\.attn\.proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"^block\.(\d+)\.mlp\.fc\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^block\.(\d+)\.mlp\.proj\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^lm_head\.", "lm_head."),
]


def reference_name(name: str) -> str:
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


def copy_into_reference(lmspec_model, reference) -> None:
    """Load the lowered model's weights into the reference GPT."""
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    import torch
    with torch.no_grad():
        for name, tensor in lmspec_model.state_dict().items():
            ref_params[reference_name(name)].copy_(tensor)
