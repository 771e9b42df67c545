"""The worker's socket loop: one DEALER to the control plane, one engine behind it.

Threads: the main thread owns the socket (ZeroMQ sockets are not thread-safe) and does all sends
and receives; the engine reports events from its own thread into an outbox queue and wakes the
main thread through a pipe that the poller watches. Heartbeats and cancels are therefore handled
while a request is generating.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket as pysocket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

import zmq

from mosaickv.engines.base import Engine, Event, Failed, Finished, GenerateRequest, TokenChunk
from mosaickv.protocol import (
    CONTROL_SENDS,
    PROTOCOL_VERSION,
    MosaicError,
    ProtocolError,
    Tensor,
    decode,
    encode,
)

log = logging.getLogger("mosaickv.worker")

MISSED_HEARTBEATS = 3
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SEND_HWM = 10_000


class WorkerExit(Exception):
    """Ends the worker with `code` (0 = clean shutdown); `message` says why, for the log."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (Z85): the control plane's public key and this worker's key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes


class Worker:
    """Connects to the control plane at `url` as `worker_id` and serves `engine` until shutdown."""

    def __init__(
        self,
        url: str,
        worker_id: str,
        engine: Engine,
        handshake_timeout_s: float = 60.0,
        curve: CurveKeys | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self._handshake_timeout_s = handshake_timeout_s
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.RCVHWM, SEND_HWM)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.LINGER, 2000)  # time to flush the last `done`s on shutdown
        if curve is not None:
            self._sock.curve_serverkey = curve.server_public
            self._sock.curve_publickey = curve.client_public
            self._sock.curve_secretkey = curve.client_secret
        self._sock.connect(url)
        self._url = url
        self._outbox: queue.SimpleQueue[tuple[str, Event]] = queue.SimpleQueue()
        self._notices: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()  # worker-level messages
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._signalled: str | None = None
        self._chunk_index: dict[str, int] = {}
        self._heartbeat_s = 1.0
        self._last_control_heartbeat = 0.0
        self._next_heartbeat = 0.0
        self._requests_total = 0
        self._tokens_total = 0
        self._kv_bytes_peak = 0
        self.policy_version = 0  # the segment policy in force (0: the backend's own settings)
        engine.set_telemetry_sink(self._telemetry)

    # -- plumbing -----------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the main thread is already due to wake up
            pass

    def _sink(self, request_id: str, event: Event) -> None:
        """Engine thread -> main thread."""
        self._outbox.put((request_id, event))
        self._wake()

    def _telemetry(self, data: Mapping[str, Any]) -> None:
        """Engine thread -> main thread: policy curves, sent as one ``telemetry`` message (or the
        message ``data["type"]`` names: ``recall``, from sampled decode steps)."""
        self._notices.put({"type": "telemetry", **data, "worker_id": self.worker_id,
                           "model": self.engine.model_name})  # fmt: skip
        self._wake()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signal.Signals(signum).name
        self._wake()

    def _send(self, message: Mapping[str, Any]) -> bool:
        """Sends without blocking; a full queue (the control plane is not reading) is logged and the
        message dropped, never queued without bound."""
        try:
            self._sock.send_multipart(encode(message), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning(
                "cannot send %s: the control plane at %s is not reading (queue full or not connected)",
                message["type"],
                self._url,
            )
            return False

    def _send_error(self, error: MosaicError) -> None:
        self._send(
            {"type": "error", "request_id": error.request_id, "code": error.code, "message": error.message}
        )

    def _receive(self) -> dict[str, Any] | None:
        """One message from the control plane, or None after answering a malformed one."""
        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
        try:
            message = decode(frames)
            if message["type"] not in CONTROL_SENDS:
                raise ProtocolError(
                    "bad_message",
                    f"type: workers do not accept {message['type']!r} messages",
                    message.get("request_id"),
                )
            return message
        except ProtocolError as exc:
            log.warning("rejected a malformed message from the control plane (%s): %s", exc.code, exc.message)
            self._send_error(exc)
            return None

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serves until shutdown; returns the process exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            self._handshake()
            self._serve()
        except WorkerExit as stop:
            (log.info if stop.code == 0 else log.error)("%s", stop)
            self._stop(linger=stop.code == 0)
            return stop.code
        except Exception:
            log.exception("the worker failed; this is a bug, please report it with the traceback above")
            self._stop(linger=False)
            return 1

    def _hello(self) -> dict[str, Any]:
        e = self.engine
        return {
            "type": "hello",
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "host": pysocket.gethostname(),
            "engine": e.engine_name,
            "model": e.model_name,
            "backend": e.backend_name,
            "device": e.device,
            "capabilities": {
                "max_context": e.max_context,
                "max_inflight": e.max_inflight,
                "method": e.method,
                "chat_template": e.chat_template,
            },
        }

    def _handshake(self) -> None:
        log.info("connecting to %s; sending hello", self._url)
        self._send(self._hello())
        deadline = time.monotonic() + self._handshake_timeout_s
        while True:
            self._check_signal()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerExit(
                    1,
                    f"no `ready` from the control plane at {self._url} within "
                    f"{self._handshake_timeout_s:g} s; check the URL (and CURVE keys for tcp://)",
                )
            if self._sock not in dict(self._poller.poll(remaining * 1000)):
                continue
            frames = self._sock.recv_multipart()
            try:
                message = decode(frames)
            except ProtocolError as exc:
                if exc.code == "protocol_version":
                    raise WorkerExit(
                        3,
                        f"the control plane answered in another protocol version ({exc.message}); "
                        f"this worker speaks version {PROTOCOL_VERSION}: upgrade one of them",
                    ) from exc
                log.warning("rejected a malformed message during the handshake: %s", exc.message)
                self._send_error(exc)
                continue
            if message["type"] == "ready":
                self._heartbeat_s = message["heartbeat_ms"] / 1000.0
                self._last_control_heartbeat = time.monotonic()
                self._next_heartbeat = time.monotonic()
                log.info(
                    "handshake done: heartbeat every %d ms; serving %s (%s, backend %s) on %s",
                    message["heartbeat_ms"],
                    self.engine.model_name,
                    self.engine.engine_name,
                    self.engine.backend_name,
                    self.engine.device,
                )
                return
            if message["type"] == "error":
                code = 3 if message["code"] == "protocol_version" else 1
                raise WorkerExit(
                    code,
                    f"the control plane refused this worker ({message['code']}): "
                    f"{message['message']} (this worker speaks protocol version {PROTOCOL_VERSION})",
                )
            if message["type"] == "shutdown":
                raise WorkerExit(0, f"shutdown before the handshake finished: {message['reason']}")
            log.warning("ignoring %s before the handshake finished (waiting for ready)", message["type"])

    def _check_signal(self) -> None:
        if self._signalled is not None:
            raise WorkerExit(0, f"{self._signalled} received: shutting down")

    def _serve(self) -> NoReturn:
        """Runs until a WorkerExit (shutdown, signal, lost control plane)."""
        while True:
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._heartbeat()
                self._next_heartbeat = now + self._heartbeat_s
            silent = now - self._last_control_heartbeat
            if silent > MISSED_HEARTBEATS * self._heartbeat_s:
                raise WorkerExit(
                    1,
                    f"no heartbeat from the control plane for {silent * 1000:.0f} ms "
                    f"({MISSED_HEARTBEATS} missed): it is gone; exiting so that no orphan "
                    "worker stays behind",
                )
            timeout_ms = max(0.0, min(self._next_heartbeat - now, self._heartbeat_s) * 1000)
            events = dict(self._poller.poll(timeout_ms))
            if self._wake_r in events:
                while True:
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            self._check_signal()
            self._flush_outbox()
            if self._sock in events:
                while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    message = self._receive()
                    if message is not None:
                        self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        mtype = message["type"]
        if mtype == "generate":
            request = GenerateRequest.from_wire(message)
            try:
                self.engine.submit(request, self._sink)
            except MosaicError as exc:
                exc.request_id = request.request_id
                log.info("request %s refused (%s): %s", request.request_id, exc.code, exc.message)
                self._send_error(exc)
                return
            self._requests_total += 1
            self._chunk_index[request.request_id] = 0
        elif mtype == "cancel":
            self.engine.cancel(message["request_id"])
        elif mtype == "heartbeat":
            self._last_control_heartbeat = time.monotonic()
        elif mtype == "stats_request":
            self._send(
                {
                    "type": "stats",
                    "nonce": message["nonce"],
                    "worker_id": self.worker_id,
                    "inflight": self.engine.inflight(),
                    "requests_total": self._requests_total,
                    "tokens_generated_total": self._tokens_total,
                    "kv_bytes": self.engine.kv_bytes(),
                    "kv_bytes_peak": self._kv_bytes_peak,
                    "engine": self.engine.stats(),
                }
            )
        elif mtype == "policy":
            self._apply_policy(message)
        elif mtype == "shutdown":
            raise WorkerExit(0, f"shutdown requested by the control plane: {message['reason']}")
        elif mtype == "ready":
            self._heartbeat_s = message["heartbeat_ms"] / 1000.0
        elif mtype == "error":
            log.warning("the control plane reported an error (%s): %s", message["code"], message["message"])

    def _apply_policy(self, message: dict[str, Any]) -> None:
        """Applies a policy to the engine and acks it; a refused one leaves the previous in force."""
        version = message["version"]
        reason: str | None = None
        try:
            self.engine.apply_policy(message["heads"])
        except MosaicError as exc:
            reason = exc.message
        except ValueError as exc:
            reason = str(exc)
        if reason is None:
            self.policy_version = version
            log.info("policy %d applied (%d layer/head entries)", version, len(message["heads"]))
        else:
            log.warning("policy %d refused, keeping policy %d: %s", version, self.policy_version, reason)
        self._send({"type": "policy_ack", "worker_id": self.worker_id, "version": version,
                    "accepted": reason is None, "reason": reason})  # fmt: skip

    def _heartbeat(self) -> None:
        kv = self.engine.kv_bytes()
        self._kv_bytes_peak = max(self._kv_bytes_peak, kv)
        self._send(
            {
                "type": "heartbeat",
                "worker_id": self.worker_id,
                "inflight": self.engine.inflight(),
                "kv_bytes": kv,
            }
        )

    def _flush_outbox(self) -> None:
        while True:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                break
            if self._send(notice) and notice["type"] == "telemetry":
                log.info("telemetry sent: %d curves of a %d-token prompt, measured in %.3f s",
                         len(notice["curves"]), notice["tokens"], notice["overhead_s"])  # fmt: skip
            elif notice["type"] == "recall":
                log.debug("recall sent: %d heads of a %d-token decode step, measured in %.3f s",
                          len(notice["heads"]), notice["tokens"], notice["overhead_s"])  # fmt: skip
        while True:
            try:
                request_id, event = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._forward(request_id, event)

    def _forward(self, request_id: str, event: Event) -> None:
        """One engine event as a protocol message."""
        if isinstance(event, TokenChunk):
            index = self._chunk_index.get(request_id, 0)
            self._chunk_index[request_id] = index + 1
            self._tokens_total += len(event.token_ids)
            message: dict[str, Any] = {
                "type": "token",
                "request_id": request_id,
                "index": index,
                "text": event.text,
                "token_ids": list(event.token_ids),
            }
            if event.logprobs is not None:
                data = struct.pack(f"<{len(event.logprobs)}f", *event.logprobs)
                message["logprobs"] = Tensor("float32", (len(event.logprobs),), data)
            if not self._send(message):
                self.engine.cancel(request_id)  # its stream is broken: stop spending compute on it
            return
        self._chunk_index.pop(request_id, None)
        if isinstance(event, Finished):
            self._kv_bytes_peak = max(self._kv_bytes_peak, event.kv_bytes)
            self._send(
                {
                    "type": "done",
                    "request_id": request_id,
                    "finish_reason": event.finish_reason,
                    "usage": {
                        "prompt_tokens": event.prompt_tokens,
                        "completion_tokens": event.completion_tokens,
                    },
                    "kv_bytes": event.kv_bytes,
                    "full_kv_bytes": event.full_kv_bytes,
                    "timing": {"prefill_ms": event.prefill_ms, "decode_ms": event.decode_ms},
                }
            )
            log.info(
                "request %s done (%s): %d prompt + %d generated tokens",
                request_id,
                event.finish_reason,
                event.prompt_tokens,
                event.completion_tokens,
            )
        elif isinstance(event, Failed):
            event.error.request_id = request_id
            self._send_error(event.error)

    def _stop(self, linger: bool) -> None:
        """Cancels what runs (each request ends with done/cancelled, sent if `linger`), closes the socket."""
        self.engine.close()
        if linger:
            self._flush_outbox()
        self._sock.close(linger=2000 if linger else 0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
