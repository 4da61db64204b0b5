"""A Hugging Face model's chat template through lmspec: `import hf` records it (chat_template.jinja, or
tokenizer_config.json's `chat_template`, with the special tokens it uses), lmspec renders it as
transformers does, `lmspec export` carries it into the ONNX bundle, and `export hf` writes it back so
that AutoTokenizer.apply_chat_template gives the same text and ids; a checkpoint finetuned with the
Alpaca template is exported with it too."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime_helpers import SHARED_DATA  # noqa: E402
from chat_templates import LLAMA3_STYLE  # noqa: E402  (tests/ is on the path)
from lmspec.compiler import load_spec  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.compiler.rewrites import spec_record  # noqa: E402
from lmspec.runtime.checkpoint.store import load_checkpoint, save_checkpoint  # noqa: E402
from lmspec.runtime.cli.main import main  # noqa: E402
from lmspec.runtime.data.chat_template import builtin_chat_template, chat_template_for, check_messages  # noqa: E402
from lmspec.runtime.data.tokenizer import load_tokenizer  # noqa: E402
from lmspec.runtime.data.tokenizer_training import train_bpe  # noqa: E402
from lmspec.runtime.export.from_checkpoint import export_bundle  # noqa: E402
from lmspec.runtime.finetune.instruct_data import AlpacaTemplate, format_alpaca_prompt  # noqa: E402
from lmspec.runtime.serve.language_model import OnnxModel  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
SETTINGS = ("--set", "layers=1", "--set", "dim=32", "--set", "heads=2", "--set", "context=64", "--set", "vocab=400")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [[{"role": "user", "content": "Hello there "}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A colour, <|eot_id|> please?"}]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    text = (SHARED_DATA / "the-verdict.txt").read_text(encoding="utf-8")
    return train_bpe(iter([text]), 400, tmp_path_factory.mktemp("bpe") / "tok.json", special_tokens=SPECIALS)


def hf_directory(path, bpe, template: str, in_config: bool):
    """A tiny random GPT-2 and its tokenizer saved by transformers: the template in chat_template.jinja
    (as transformers 5 saves it), or in tokenizer_config.json with AddedToken-style special tokens."""
    from tokenizers import Tokenizer
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=400)
    transformers.GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.tokenizer.to_str()),
                                                     bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                     chat_template=template)
    tokenizer.save_pretrained(path)
    if in_config:
        (path / "chat_template.jinja").unlink()
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        config["eos_token"] = {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def rendered(tokenizer, messages, **kw):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kw)


@pytest.mark.parametrize("template, in_config", [(LLAMA3_STYLE, False), (CHATML, True)])
def test_import_records_export_writes_back_and_transformers_renders_the_same(bpe, tmp_path, template, in_config):
    source = hf_directory(tmp_path / "hf", bpe, template, in_config)
    assert main(["import", "hf", str(source), "--spec", "specs/gpt2.arch", *SETTINGS, "-o", str(tmp_path / "run")]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    record = ckpt.train_config["chat_template"]
    assert record == {"source": "tokenizer_config.json" if in_config else "chat_template.jinja", "template": template,
                      "special_tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}}

    theirs = transformers.AutoTokenizer.from_pretrained(source)
    ours = chat_template_for(load_tokenizer(ckpt.tokenizer), record)
    for messages in MESSAGES:
        assert ours.render(check_messages(messages)).ids == rendered(theirs, messages, sanitize_control_tokens=True)
        assert ours.text(check_messages(messages[:3])) == theirs.apply_chat_template(
            messages[:3], add_generation_prompt=True, tokenize=False)
    end = "<|eot_id|>" if template is LLAMA3_STYLE else "<|im_end|>"
    assert ours.stop_ids[0] == bpe.tokenizer.token_to_id(end)

    # Into the ONNX bundle, where generate --chat and serve read it.
    export_bundle(str(tmp_path / "run"), str(tmp_path / "onnx" / "model.onnx"), log=lambda *_: None)
    bundle = OnnxModel(tmp_path / "onnx" / "model.onnx")
    assert bundle.meta["chat_template"] == record
    served = chat_template_for(bundle.tokenizer, bundle.meta["chat_template"])
    assert served.render(check_messages(MESSAGES[1])).ids == rendered(theirs, MESSAGES[1], sanitize_control_tokens=True)

    # And back out: the carried files unchanged, so transformers renders what it rendered before.
    assert main(["export", "hf", str(tmp_path / "run"), "-o", str(tmp_path / "back")]) == 0
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "back" / name).is_file() == (source / name).is_file()
        if (source / name).is_file():
            assert (tmp_path / "back" / name).read_text() == (source / name).read_text()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for messages in MESSAGES:
        assert rendered(again, messages) == rendered(theirs, messages)
        assert again.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("train_config", [
    {"finetune": "instruct", "template": "alpaca"},  # as checkpoints finetuned before templates were recorded
    "recorded",
])
def test_an_alpaca_checkpoint_exports_its_template_for_transformers(bpe, tmp_path, train_config):
    """A checkpoint finetuned with the Alpaca template: transformers renders the prompt training built."""
    if train_config == "recorded":
        train_config = {"finetune": "instruct", "template": "alpaca",
                        "chat_template": builtin_chat_template("alpaca", bpe)}
    settings = {"layers": 1, "dim": 32, "heads": 2, "context": 64, "vocab": 400}
    graph = load_spec("specs/gpt2.arch", settings)
    save_checkpoint(tmp_path / "run", step=0, model=lower(graph, seed=0), optimizer=None, rng=None,
                    train_config=train_config, metrics={}, tokenizer=bpe.to_json(), spec=spec_record(graph, settings))
    assert main(["export", "hf", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end_of_text|>"  # this vocabulary's end-of-text token
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    record = {"instruction": "Name three primary colours.", "input": "Be brief.", "output": ""}
    messages = [{"role": "system", "content": record["input"]}, {"role": "user", "content": record["instruction"]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        format_alpaca_prompt(record)
    assert rendered(tokenizer, messages) == AlpacaTemplate(bpe).prompt_of(record)
    answered = messages + [{"role": "assistant", "content": "Red."}]
    assert tokenizer.apply_chat_template(answered, tokenize=False).endswith("### Response:\nRed.<|end_of_text|>")
