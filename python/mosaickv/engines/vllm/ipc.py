"""The worker's side of its pipes to vLLM's engine-core process (telemetry.py, policies.py)."""

import os
import shutil
import tempfile

import zmq


class BoundSocket:
    """A ZeroMQ socket of ``kind`` bound on a private ``ipc://`` path (in a fresh mode-0700
    directory), whose address ``export`` puts in the environment variable ``env``: the processes
    this one spawns from then on (AsyncLLM's engine core) inherit it and connect."""

    def __init__(self, kind: int, name: str, env: str) -> None:
        self._dir = tempfile.mkdtemp(prefix=f"mosaickv-{name}-")
        self.address = f"ipc://{os.path.join(self._dir, f'{name}.sock')}"
        self.env = env
        self._ctx = zmq.Context()
        self.socket = self._ctx.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)

    def export(self) -> None:
        os.environ[self.env] = self.address

    def close(self) -> None:
        """Close the socket (from the thread that uses it) and remove its directory."""
        self.socket.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
