"""ONNX bundles: the bundle format (a model and its sidecar), export steps, onnxruntime's
optimisation and quantisation. May import: everything below it; reading a bundle imports no torch."""
