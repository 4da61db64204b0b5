"""Exported models run by onnxruntime: text generation by a language model (language_model.py), a
classifier, the batching scheduler, and the OpenAI-compatible HTTP app. No torch here. May import:
export's bundle format, data, errors."""
