"""A sliding-window layer's KV cache keeps only what its window can still see. The model alternates
layers with a window of 3 keys and global layers (two layers here, one of each kind, so that the
export is quick); its export keeps 2 positions for the first kind and all of them for the second.
Checked from the CLI's export through generation with rows of different lengths (padding on the
left), past the context, and the server's running batch with rows that join, leave and merge, each
against the PyTorch model's own tokens."""
import json

import numpy as np
import onnx
import pytest
import torch

from runtime_helpers import ALTERNATING
from lmspec.runtime.cli.main import main
from lmspec.runtime.export.bundle import BundleError, bundle_sidecar
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest
from lmspec.runtime.serve.running_batch import RunningBatch
from lmspec.runtime.train.sampling import generate

from test_export import _char_tokenizer, random_checkpoint

KEPT = [2, None]  # window 3: the next query sees itself and the 2 positions before it


@pytest.fixture(scope="module")
def alternating(tmp_path_factory):
    """(the PyTorch model, its tokenizer, the exported bundle) of the alternating spec, its weights
    scaled x3 so that attention is far from uniform and a wrong window shows."""
    root = tmp_path_factory.mktemp("bounded")
    spec = root / "alternating.arch"
    spec.write_text(ALTERNATING)

    def sharpen(model):
        for p in model.parameters():
            p.mul_(3.0)
    model, tokenizer = random_checkpoint(root / "run", str(spec), {"vocab": 96, "layers": 2},
                                         tokenizer=_char_tokenizer(), tweak=sharpen)
    assert main(["export", str(root / "run"), "-o", str(root / "m.onnx")]) == 0  # in process: no interpreter to start
    return model.eval(), tokenizer, root / "m.onnx"


def test_the_export_keeps_a_window_per_sliding_layer_and_matches_pytorch(alternating):
    _, _, bundle = alternating
    meta = json.loads(bundle_sidecar(bundle).read_text())
    assert meta["cache"]["kept"] == KEPT
    # the parity check feeds 16 prompt tokens then 4 more: the bounded layers have dropped keys by then
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4 and meta["parity"]["fp32"]["filled_cache"] <= 1e-4
    graph = onnx.load(str(bundle), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["past_key_values.0.key"][2] == dims["present.0.key"][2] == "past_sequence_length_up_to_2"
    assert dims["past_key_values.1.key"][2] == "past_sequence_length"
    model = OnnxModel(bundle)
    ids = np.arange(20, dtype=np.int64)[None] % 96
    _, past = model.forward(ids)
    assert [p.shape[2] for p in past[::2]] == [2, 20]
    _, past = model.forward(ids[:, :1], np.ones((1, 21), dtype=np.int64), np.array([[20]]), past)
    assert [p.shape[2] for p in past[::2]] == [2, 21]


def test_padded_rows_and_generation_past_the_context_give_pytorchs_tokens(alternating):
    """Prompts of 2 to 24 tokens in one left-padded batch, 20 new tokens each: the longest passes the
    context of 32 and goes on over a sliding window, as the PyTorch sampler does."""
    model, tokenizer, bundle = alternating
    prompts = [tokenizer.encode(t) for t in ("ab", "bounded caches", "a window of three keys, ok")]
    got = OnnxModel(bundle).generate([GenerationRequest(p, 20, temperature=0, stop_at_eot=False) for p in prompts])
    with torch.no_grad():
        assert [c.tokens for c in got] == [generate(model, p, 20, temperature=0) for p in prompts]


@pytest.mark.parametrize("slack", [0, 10**9], ids=["cohorts-apart", "cohorts-merged"])
def test_the_running_batch_keeps_each_layers_bound_as_rows_join_leave_and_merge(alternating, slack):
    _, tokenizer, bundle = alternating
    model = OnnxModel(bundle, threads=1)
    texts, lengths = ["it was", "the window", "x", "layers differ"], (12, 5, 16, 9)
    requests = [GenerationRequest(tokenizer.encode(t), n, temperature=0, stop_at_eot=False)
                for t, n in zip(texts, lengths)]
    rows = [model.new_row(i, r) for i, r in enumerate(requests)]
    batch = RunningBatch(model)
    batch.merge_slack = slack
    joins = {0: [rows[0]], 2: [rows[1], rows[2]], 6: [rows[3]]}
    tokens, sizes = {i: [] for i in range(4)}, []
    for step in range(60):
        events = (batch.join(joins[step]) if step in joins else []) + batch.step()
        for e in events:
            if e.token is not None:
                tokens[e.index].append(e.token)
        for cohort in batch.cohorts:
            sizes.append(([p.shape[2] for p in cohort.past[::2]], cohort.mask.shape[1]))
        if not len(batch) and step > max(joins):
            break
    for i, request in enumerate(requests):
        [alone] = model.generate([request])
        assert tokens[i] == alone.tokens, i
    assert sizes and all(past == [min(columns, k) if k else columns for k in KEPT] for past, columns in sizes)


def test_a_corrupt_bound_is_refused(alternating, tmp_path):
    _, _, bundle = alternating
    for name in (bundle.name, bundle.name + ".data"):
        if (bundle.parent / name).exists():
            (tmp_path / name).write_bytes((bundle.parent / name).read_bytes())
    meta = json.loads(bundle_sidecar(bundle).read_text())
    meta["cache"]["kept"] = [2, None, 0]
    bundle_sidecar(tmp_path / bundle.name).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'kept' is not, for each layer"):
        OnnxModel(tmp_path / bundle.name)
