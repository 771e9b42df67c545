"""Segment policies from our worker to vLLM's engine-core process (the reverse of telemetry.py).

The impl runs in the engine-core process that ``AsyncLLM`` spawns, so a ``policy`` the control
plane sends to the worker travels on over one ZeroMQ PUB -> SUB pipe:

- worker side (``PolicyPublisher``, made by engines/vllm/engine.py before AsyncLLM starts): binds a
  PUB socket on a fresh ``ipc://`` address, exports it in ``MOSAICKV_POLICY_ADDR`` (the engine
  core inherits the environment) and publishes each accepted policy as a wire ``policy`` message;
  it re-publishes the current one every ``REPEAT_S``, because a subscriber that connects later
  (PUB/SUB drops what was sent before it joined) must still get it.
- engine-core side (``current_methods``): a SUB socket, polled without blocking when a prompt is
  stored; the newest version wins. A policy applies to prompts stored from then on (running requests keep
  the methods they started with), exactly like the hf engine.

``check_fits`` is what the worker checks before it accepts a policy: the model's layers and heads,
one token ratio per layer (``policy.layer_params``), and bytes within what vLLM's pages were sized
for at start (the mean keep ratio over heads at most ``MosaicSettings.keep_ratio``): a larger one
would need bigger pages than vLLM allocated.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import zmq

from mosaickv.core.methods.mosaic import MosaicMethod
from mosaickv.engines.vllm.config import MosaicSettings
from mosaickv.engines.vllm.ipc import BoundSocket
from mosaickv.policy import layer_params
from mosaickv.protocol import ProtocolError, decode, encode

ADDR_ENV = "MOSAICKV_POLICY_ADDR"
REPEAT_S = 0.5
logger = logging.getLogger("vllm.plugins.mosaickv")


def check_fits(
    settings: MosaicSettings, heads: list[dict[str, Any]], n_layers: int, n_kv_heads: int
) -> dict[int, dict[str, Any]]:
    """The policy's mosaic parameters per layer, or ValueError with the reason it cannot run here."""
    params = layer_params(heads, n_layers, n_kv_heads)
    mean_keep = sum(h["keep_ratio"] for h in heads) / len(heads)
    if mean_keep > settings.keep_ratio + 1e-9:
        raise ValueError(
            f"the policy keeps {mean_keep:.4f} of the elements on average, more than the keep_ratio "
            f"{settings.keep_ratio} vLLM's pages were sized for; restart the worker with "
            f"--backend-option keep_ratio={mean_keep:.4f} or plan for less"
        )
    return params


class PolicyPublisher:
    """Worker side: publishes the current policy to the engine-core process (see the module doc)."""

    def __init__(self) -> None:
        self._bound = BoundSocket(zmq.PUB, "policy", ADDR_ENV)
        self.address = self._bound.address
        self._lock = threading.Lock()
        self._frames: list[bytes] | None = None
        self.version = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._repeat, name="mosaickv-policy-pub", daemon=True)
        self._thread.start()

    def export(self) -> None:
        """Publish the address to the processes this one spawns from now on."""
        self._bound.export()

    def publish(self, heads: list[dict[str, Any]]) -> int:
        """Send ``heads`` (a checked policy, wire form) as the next version; returns it."""
        with self._lock:
            self.version += 1
            self._frames = encode({"type": "policy", "version": self.version, "heads": heads})
            self._bound.socket.send_multipart(self._frames)
            return self.version

    def _repeat(self) -> None:
        while not self._closed.wait(REPEAT_S):
            with self._lock:
                if self._frames is not None:
                    self._bound.socket.send_multipart(self._frames)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._bound.close()


class _Subscriber:
    """Engine-core side: the newest policy published to ``address``."""

    def __init__(self, address: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(address)
        self.version = 0
        self.heads: list[dict[str, Any]] | None = None
        self.methods: dict[tuple[int, MosaicSettings, int, int], list[MosaicMethod]] = {}  # one version's

    def poll(self) -> None:
        while self._socket.poll(0):
            frames = self._socket.recv_multipart()
            try:
                message = decode(frames)
            except ProtocolError as err:
                logger.warning("dropped a malformed policy frame from the worker: %s", err)
                continue
            if message["type"] == "policy" and message["version"] > self.version:
                self.version, self.heads = message["version"], message["heads"]
                logger.info("MosaicKV policy %d received: it applies to prompts stored from now on",
                            self.version)


_subscriber: _Subscriber | None = None
_lock = threading.Lock()


def current_methods(settings: MosaicSettings, n_layers: int, n_kv_heads: int) -> list[MosaicMethod] | None:
    """One method per MosaicKV layer (``settings`` with the policy's parameters for that layer) from
    the newest policy the worker published; None before the first or when no worker started this
    vLLM (plain ``vllm serve``). Built once per version: every layer asks at every stored prompt."""
    global _subscriber
    address = os.environ.get(ADDR_ENV)
    if not address:
        return None
    with _lock:
        if _subscriber is None:
            _subscriber = _Subscriber(address)
        sub = _subscriber
        sub.poll()
        if sub.heads is None:
            return None
        key = (sub.version, settings, n_layers, n_kv_heads)
        if key not in sub.methods:
            params = layer_params(sub.heads, n_layers, n_kv_heads)
            sub.methods = {key: [settings.make_method(**params[i]) for i in range(n_layers)]}
        return sub.methods[key]
