"""`lmspec classify`: an exported classifier run by onnxruntime (no torch on this path), or a
checkpoint handed to classify_commands (PyTorch). Both print the same lines. `--provider` places a
bundle (onnxruntime's providers), `--device` a checkpoint (a torch device); each refuses the other's kind.

A classifier bundle's sidecar (runtime/export/bundle.py) holds, besides the tokenizer, the class names in
index order, the most tokens a text keeps and the pad id, so that texts are encoded exactly as
`lmspec classify CHECKPOINT` encodes them.
"""
from __future__ import annotations

import os

import numpy as np

from lmspec.runtime.export.bundle import (
    CLASSIFIER,
    BundleError,
    bundle_kind,
    bundle_tokenizer,
    find_model_file,
    open_session,
    read_sidecar,
)
from lmspec.runtime.data.text_encoder import TextEncoder

BATCH = 32  # texts per onnxruntime call, as `lmspec classify CHECKPOINT` batches them


class OnnxClassifier:
    """An exported classifier in an onnxruntime session, with its labels and text encoder."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        self.path = find_model_file(path)
        self.meta = read_sidecar(self.path)
        if bundle_kind(self.meta) != CLASSIFIER:
            raise BundleError(f"{self.path}: an exported language model, not a classifier; generate text with "
                              f"`lmspec generate {self.path}`, or export a run of `lmspec finetune classify`")
        self.labels: list[str] = self.meta["labels"]
        self.encoder = TextEncoder(bundle_tokenizer(self.path, self.meta), self.meta["max_length"],
                                         self.meta["pad_id"])
        self.session = open_session(self.path, threads, providers)
        inputs = sorted(i.name for i in self.session.get_inputs())
        if inputs != ["input_ids", "lengths"]:
            raise BundleError(f"{self.path}: takes {', '.join(inputs)}, but its sidecar describes a classifier "
                              f"(input_ids, lengths)")

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """[len(texts), classes] class probabilities; texts of like length share a batch."""
        ids = [self.encoder.encode(t) for t in texts]
        out = np.zeros((len(ids), len(self.labels)))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for first in range(0, len(order), BATCH):
            rows = order[first:first + BATCH]
            tokens, lengths = right_pad([ids[i] for i in rows], self.encoder.pad_id)
            logits = self.session.run(["logits"], {"input_ids": tokens, "lengths": lengths})[0]
            out[rows] = softmax(logits.astype(np.float64))
        return out


def right_pad(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [batch, longest] padded on the right with `pad_id`, and lengths [batch] (int64 both)."""
    tokens = np.full((len(token_lists), max(len(t) for t in token_lists)), pad_id, dtype=np.int64)
    for row, ids in enumerate(token_lists):
        tokens[row, :len(ids)] = ids
    return tokens, np.array([len(t) for t in token_lists], dtype=np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
