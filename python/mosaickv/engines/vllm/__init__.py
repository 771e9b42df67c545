"""MosaicKV inside vLLM: the ``CUSTOM`` attention backend (``backend``), its plugin entry point
(``plugin.register``), settings and page sizes (``config``), and the worker engine (``engine``).

Nothing here imports vLLM at package import time: vLLM lives in its own virtual environment
(scripts/setup-vllm.mjs), and the main environment must be able to import ``config``.
"""
