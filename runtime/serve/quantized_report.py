"""What quantising costs, measured when `lmspec export --quantize` runs: for the fp32 model and its int8
and int4 quantisations, the file's size, the loss on held-out text and its change against fp32, and the
speed of greedy decoding. It runs each as `lmspec generate` runs a bundle, so it lives with serving;
the CLI hands `report_on_quantizing`'s measure to export_bundle, which builds the three models.

Held-out text is the file export is given (validation_text, `--eval-data`: all of it), else the
validation split of the run the checkpoint comes from, cut as `lmspec train` cut it (the last tenth of
the corpus's tokens, or the validation shards), read from the run's config.toml. At most WINDOWS
windows of min(context, WINDOW_TOKENS) tokens, evenly spaced, are scored, each model on the same ones,
in onnxruntime (OnnxModel, as `lmspec generate` runs a bundle). Decoding is batch 1, greedy, NEW_TOKENS
tokens after a PROMPT_TOKENS-token prompt (its prefill included), the best of three runs after a warm-up.
Without held-out text the report has sizes and speeds, and says why there is no loss.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOWS = 16
WINDOW_TOKENS = 256
NEW_TOKENS = 32
PROMPT_TOKENS = 8
CORPUS_LIMIT = 16 * 2**20  # a larger text corpus is not re-tokenized at export (seconds per MiB): --eval-data FILE
ROWS = ("fp32", "int8", "int4")


@dataclass
class HeldOut:
    """The windows every model is scored on: `windows` [n, seq + 1] token ids (inputs, then the last
    target), cut from `source` at `starts`."""

    source: str
    windows: np.ndarray
    starts: list[int]

    @property
    def seq(self) -> int:
        return self.windows.shape[1] - 1

    def describe(self) -> dict:
        return {"source": self.source, "windows": len(self.windows), "seq": self.seq, "tokens": self.windows.size
                - len(self.windows), "starts": self.starts}


def report_on_quantizing(checkpoint: str, validation_text: str | None, quantize: str, log=print):
    """The `measure` export_bundle calls with {"fp32", "int8", "int4": ONNX file} and the sidecar, which
    logs the table and returns the report; None for a classifier (its loss is not a language model's).
    Held-out text is read first, so an --eval-data that cannot be read costs no export."""
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.runtime.checkpoint.store import load_checkpoint
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.errors import UsageError
    from lmspec.runtime.finetune.classifier import classify_record

    ckpt = load_checkpoint(checkpoint)
    if classify_record(ckpt) is not None:
        if validation_text is not None:
            raise UsageError("--eval-data: the report on --quantize measures a language model's loss; this "
                             "checkpoint is a classifier")
        return None
    held, no_loss = held_out(ckpt, load_tokenizer(ckpt.tokenizer), graph_from_record(ckpt.spec).context,
                             validation_text)

    def measure(models: dict[str, Path], meta: dict) -> dict:
        started = time.perf_counter()
        report = quantization_report(models, meta, held, no_loss, installed=quantize)
        report["seconds"] = round(time.perf_counter() - started, 1)
        for line in report_lines(report):
            log(line)
        log(f"  (measured in {report['seconds']:.1f} s; --no-report skips it)")
        return report

    return measure


def held_out(checkpoint, tokenizer, context: int | None, validation_text: str | None = None
             ) -> tuple[HeldOut | None, str | None]:
    """(the held-out windows, None), or (None, why there are none). A `validation_text` that cannot be
    read is an error (DataError); the run's data, a reason."""
    from lmspec.runtime.errors import UserError

    seq = min(context or WINDOW_TOKENS, WINDOW_TOKENS)
    if validation_text is not None:
        return _windows_of(validation_text, tokenizer, seq, whole=True, label=str(validation_text)), None
    try:
        run = _run_data(checkpoint)
        if isinstance(run, str):
            return None, run
        data, text_field = run
        label = f"{data or 'the default corpus'} (the validation split of the run it was trained on)"
        return _windows_of(data, tokenizer, seq, whole=False, label=label, text_field=text_field), None
    except (UserError, OSError) as err:
        return None, str(err)


def _run_data(checkpoint) -> tuple[str | None, str] | str:
    """(the corpus `lmspec train` read for this checkpoint's run, None for its default corpus; its text
    field), from RUN/config.toml; or why the run's data is not known."""
    import tomllib

    from lmspec.runtime.checkpoint.layout import CHECKPOINTS_DIR, CONFIG_FILE, run_options_origin

    step = Path(checkpoint.path)
    run = step.parent.parent if step.parent.name == CHECKPOINTS_DIR else None
    config = run / CONFIG_FILE if run is not None else None
    if config is None or not config.is_file():
        return (f"the checkpoint's run records no training data (no {CONFIG_FILE} of `lmspec train` beside "
                f"{CHECKPOINTS_DIR}/); name held-out text with --eval-data FILE")
    text = config.read_text(encoding="utf-8")
    verb, base = run_options_origin(text)
    if verb != "train":
        return f"{config} is not `lmspec train`'s (a finetuned run); name held-out text with --eval-data FILE"
    try:
        options = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        return f"{config}: not TOML ({err})"
    data = options.get("data")
    if data is None:
        return None, "text"
    path = Path(data)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        return f"the run's data {path} ({config}) is gone; name held-out text with --eval-data FILE"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    from lmspec.runtime.train.run import shard_data
    if shard_data(str(path)) is None and size > CORPUS_LIMIT:
        return (f"the run's corpus {path} is {size / 2**20:,.0f} MiB, too much to re-read at export; name "
                f"held-out text with --eval-data FILE")
    return str(path), str(options.get("text-field", "text"))


def _windows_of(data: str | None, tokenizer, seq: int, whole: bool, label: str, text_field: str = "text") -> HeldOut:
    """Up to WINDOWS windows of `seq` tokens (fewer, or shorter, for a short text) evenly spaced over the
    text or shards `data` (None: lmspec train's default corpus): all of it (`whole`), or the validation
    part `lmspec train` cut from it."""
    from lmspec.runtime.data.corpus import default_corpus_text, read_text_data
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.errors import DataError
    from lmspec.runtime.train.run import shard_data

    shards = shard_data(data) if data is not None else None
    if shards is not None:
        if shards.tokenizer().to_json() != tokenizer.to_json():
            raise DataError(f"{data}: tokenized with another tokenizer than the checkpoint's")
        split = shards.val
        seq = min(seq, max((len(s) for s in split.shards), default=0) - 1)
        if seq < 1:
            raise DataError(f"{data}: its validation shards hold fewer than two tokens")
        total = split.check_fits(seq)
        starts = np.linspace(0, total - 1, min(WINDOWS, total)).round().astype(np.int64)
        import torch
        x, y = split.windows(torch.from_numpy(starts), seq)
        windows = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
        return HeldOut(f"{label}, validation shards", windows, starts.tolist())
    text = read_text_data(data, text_field) if data is not None else default_corpus_text()
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if not whole:
        ids = TokenData(ids).val.numpy()
    if len(ids) < 2:
        raise DataError(f"{label}: holds fewer than two tokens to score")
    seq = min(seq, len(ids) - 1)
    starts = np.linspace(0, len(ids) - seq - 1, min(WINDOWS, len(ids) - seq)).round().astype(np.int64)
    return HeldOut(label, np.stack([ids[s:s + seq + 1] for s in starts]), starts.tolist())


def mean_loss(model, held: HeldOut) -> float:
    """The mean cross-entropy (nats per token) of `model` (an OnnxModel) over the held-out windows."""
    total, count = 0.0, 0
    for window in held.windows:
        logits, _ = model.forward(window[None, :-1])
        logits = logits[0].astype(np.float64)
        top = logits.max(axis=-1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
        total += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return total / count


def decode_speed(model, prompt: list[int]) -> float:
    """Greedy tokens per second at batch 1: NEW_TOKENS after `prompt` (its prefill counted), the best of
    three runs after a short warm-up (other work on the machine only ever slows a run down)."""
    from lmspec.runtime.serve.requests import GenerationRequest

    model.generate([GenerationRequest(prompt, 4, temperature=0, stop_at_eot=False)])  # the session's first runs
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        [done] = model.generate([GenerationRequest(prompt, NEW_TOKENS, temperature=0, stop_at_eot=False)])
        best = min(best, time.perf_counter() - started)
    return len(done.tokens) / best


def quantization_report(models: dict[str, Path], meta: dict, held: HeldOut | None, no_loss: str | None,
                        installed: str) -> dict:
    """The report on `models` ({"fp32", "int8", "int4": ONNX file}), each opened as a bundle with
    `meta` as its sidecar (written beside it): one row each, in ROWS' order."""
    from lmspec.runtime.export.bundle import bundle_sidecar
    from lmspec.runtime.serve.language_model import OnnxModel

    prompt = held.windows[0][:PROMPT_TOKENS].tolist() if held is not None else _prompt(meta)
    rows = []
    for label in ROWS:
        path = models[label]
        bundle_sidecar(path).write_text(json.dumps({**meta, "file": path.name}) + "\n", encoding="utf-8")
        model = OnnxModel(path)
        row = {"model": label, "size_mib": round(model.weight_bytes / 2**20, 3)}
        if held is not None:
            row["loss"] = mean_loss(model, held)
        row["tokens_per_s"] = round(decode_speed(model, prompt), 1)
        rows.append(row)
        del model
    if held is not None:
        for row in rows:
            row["loss_change_pct"] = 100.0 * (row["loss"] - rows[0]["loss"]) / rows[0]["loss"]
    return {"installed": installed, "held_out": held.describe() if held is not None else None,
            "no_loss": no_loss, "decode": {"batch": 1, "prompt_tokens": len(prompt), "new_tokens": NEW_TOKENS},
            "rows": rows}


def _prompt(meta: dict) -> list[int]:
    """A prompt when there is no held-out text: the end-of-text token, or token 0, repeated."""
    return [meta["eot_id"] if meta.get("eot_id") is not None else 0] * PROMPT_TOKENS


def report_lines(report: dict) -> list[str]:
    """The report as the export prints it: a heading, one line per model, and why there is no loss."""
    held, decode = report["held_out"], report["decode"]
    scored = (f"loss on {held['windows']} windows of {held['seq']} tokens of {held['source']}; "
              if held is not None else "")
    lines = [f"what quantizing costs ({scored}decode: batch {decode['batch']}, greedy, {decode['new_tokens']} "
             f"tokens after {decode['prompt_tokens']}):",
             f"  {'model':<6} {'size':>10} {'val loss':>9} {'change':>8} {'decode':>12}"]
    for row in report["rows"]:
        loss = f"{row['loss']:9.4f}" if "loss" in row else f"{'-':>9}"
        change = ("-" if row["model"] == "fp32" else f"{row['loss_change_pct']:+.2f}%") if "loss" in row else "-"
        mark = "  (installed)" if row["model"] == report["installed"] else ""
        lines.append(f"  {row['model']:<6} {row['size_mib']:>6.1f} MiB {loss} {change:>8} "
                     f"{row['tokens_per_s']:>6.0f} tok/s{mark}")
    if held is None:
        lines.append(f"  no loss: {report['no_loss']}")
    return lines
