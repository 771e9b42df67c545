"""The embedded engine: transformers models with our own decode loop and a KV-backend seam.

- models.py: `load_model(name, device) -> (model, tokenizer)`, offline
  (smollm2-135m, tiny-random, a local directory)
- backends.py: how a request's KV cache is held (`stock` now, `mosaickv` from issue 4)
- decode.py: the per-request loop (prefill, sampling, stop strings, streaming text)
- engine.py: `HFEngine`, the step scheduler behind the worker
"""
