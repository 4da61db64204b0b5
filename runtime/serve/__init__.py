"""Exported models run by onnxruntime: language models and classifiers, the batching scheduler, and
the OpenAI-compatible HTTP app. No torch here. May import: export's bundle format, data, errors."""
