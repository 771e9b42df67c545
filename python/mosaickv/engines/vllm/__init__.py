"""MosaicKV inside vLLM: the ``CUSTOM`` attention backend (``backend``), its plugin entry point
(``plugin.register``), settings and page sizes (``config``), the worker engine (``engine``), and
the cache manager's vLLM adapter (``cache``, not used by the backend yet).

Nothing here imports vLLM at package import time: vLLM lives in its own virtual environment
(scripts/setup-vllm.mjs), and the main environment must be able to import ``config``.
"""
