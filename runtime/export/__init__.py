"""ONNX bundles: the bundle format (a model and its sidecar; bundle.py, which imports no torch), the
steps from a checkpoint to a bundle (from_checkpoint.py), onnxruntime's optimisation and quantisation
(optimize.py) and the quantized token-embedding lookups (quantized_lookups.py). May import: everything
below it."""
