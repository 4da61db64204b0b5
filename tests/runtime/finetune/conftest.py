"""The fixtures instruction tuning (test_instruct.py) and preference tuning (test_dpo.py) share:
`bpe`, a small byte-level BPE with the chat control tokens, and `base_run`, an untrained GPT-2-shaped
model with it. test_classify.py and test_lora_merge.py define their own `base_run` (a character-level
base), which takes the place of this one in those files."""
import pytest

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.checkpoint.store import save_checkpoint


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, bpe):
    """A small GPT-2-shaped model with that tokenizer, saved untrained (finetuning only needs weights)."""
    settings = {"layers": 2, "dim": 32, "heads": 2, "context": 256, "vocab": 400, "dropout": 0.0}
    graph = load_spec("specs/gpt2.arch", settings)
    run = tmp_path_factory.mktemp("base") / "run"
    save_checkpoint(run, step=0, model=lower(graph, seed=0), optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=bpe.to_json(), spec=spec_record(graph, settings))
    return run
