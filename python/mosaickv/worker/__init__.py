"""The worker process: hosts one engine and speaks docs/PROTOCOL.md to the control plane over a
ZeroMQ DEALER. Run it with ``python -m mosaickv.worker --help``."""
