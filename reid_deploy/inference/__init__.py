"""Inference: preprocessing, the ``FeatureExtractor`` interface and its PyTorch / ONNX Runtime / TensorRT
runtimes, model metadata and batched extraction. Imports only the base modules, ``data`` and ``model``."""
