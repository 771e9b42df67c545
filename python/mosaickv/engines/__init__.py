"""Engines that a worker can host: `hf` (embedded, transformers), `vllm`, `sglang`.

engines/base.py is the contract between an engine and the worker.
"""
