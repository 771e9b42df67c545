"""The worker process end to end: real `python -m mosaickv.worker` processes (tiny-random model)
connected over ipc:// to a real ZeroMQ ROUTER that this test drives as the control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mosaickv.protocol import PROTOCOL_VERSION, decode, encode

# tiny-random: 2 layers x 2 KV heads x head_dim 16, float32, K and V.
TINY_KV_BYTES_PER_TOKEN = 512
HEARTBEAT_MS = 1000
START_TIMEOUT_S = 180.0  # workers start in parallel on a small, shared CPU


class ControlPlane:
    """A ROUTER socket with one inbox per worker. While waiting for a message it sends heartbeats
    to the workers in `beating`, as a control plane does."""

    def __init__(self, directory: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.url = f"ipc://{directory}/cp.sock"
        self.sock.bind(self.url)
        self.inbox: dict[str, list[dict[str, Any]]] = {}
        self.worker_heartbeats: dict[str, int] = {}
        self.beating: set[str] = set()
        self._next_beat = 0.0
        self.logs = directory

    def spawn(self, worker_id: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{worker_id}.log", "wb")  # noqa: SIM115 - closed by the process exit
        cmd = [sys.executable, "-m", "mosaickv.worker", "--connect", self.url, "--worker-id", worker_id,
               "--engine", "hf", "--model", "tiny-random", "--max-inflight", "2", *extra]  # fmt: skip
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def log_of(self, worker_id: str) -> str:
        return (self.logs / f"{worker_id}.log").read_text()

    def send(self, worker_id: str, message: dict[str, Any]) -> None:
        self.sock.send_multipart([worker_id.encode(), *encode(message)])

    def send_raw(self, worker_id: str, *frames: bytes) -> None:
        self.sock.send_multipart([worker_id.encode(), *frames])

    def _pump(self, timeout_s: float) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            for wid in list(self.beating):
                try:
                    self.send(wid, {"type": "heartbeat", "worker_id": wid, "inflight": 0, "kv_bytes": 0})
                except zmq.ZMQError as exc:  # the worker has gone (shutdown under test): stop beating
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    self.beating.discard(wid)
            self._next_beat = now + HEARTBEAT_MS / 3000
        if self.sock.poll(min(timeout_s, HEARTBEAT_MS / 3000) * 1000):
            wid, *frames = self.sock.recv_multipart()
            message = decode(frames)  # the worker must only ever send valid messages
            if message["type"] == "heartbeat":
                self.worker_heartbeats[wid.decode()] = self.worker_heartbeats.get(wid.decode(), 0) + 1
            else:
                self.inbox.setdefault(wid.decode(), []).append(message)

    def recv(self, worker_id: str, request_id: str | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        """The oldest message from `worker_id` (about `request_id` if given; others stay queued)."""
        deadline = time.monotonic() + timeout_s
        while True:
            inbox = self.inbox.setdefault(worker_id, [])
            for i, message in enumerate(inbox):
                if request_id is None or message.get("request_id") == request_id:
                    return inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no message from {worker_id} in {timeout_s} s; its log:\n{self.log_of(worker_id)}"
                )
            self._pump(remaining)

    def wait_exit(self, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker process did not exit")
            self._pump(0.05)
        return proc.returncode

    def handshake(self, worker_id: str, heartbeat_ms: int = HEARTBEAT_MS) -> dict[str, Any]:
        hello = self.recv(worker_id, timeout_s=START_TIMEOUT_S)
        assert hello["type"] == "hello"
        self.send(worker_id, {"type": "ready", "worker_id": worker_id, "heartbeat_ms": heartbeat_ms})
        return hello

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@contextmanager
def mosaickv_worker(directory: Path, worker_id: str, options: Sequence[str]) -> Iterator[ControlPlane]:
    """A control plane with one ready worker (tiny-random, backend mosaickv with `options`), torn
    down on exit."""
    plane = ControlPlane(directory)
    flags = [a for o in options for a in ("--backend-option", o)]
    proc = plane.spawn(worker_id, "--backend", "mosaickv", *flags)
    try:
        plane.handshake(worker_id)
        plane.beating.add(worker_id)
        yield plane
    finally:
        proc.kill()
        proc.wait()
        plane.close()


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("cp"))
    yield plane
    plane.close()


@pytest.fixture(scope="module")
def procs(cp: ControlPlane) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Every worker process of this module, started at once so that their slow imports overlap."""
    # Those handshaken late wait for `ready` while the first one is tested.
    started = {
        wid: cp.spawn(wid, "--handshake-timeout", "600") for wid in ("main", "orphan", "sigterm", "version")
    }
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _generate(request_id: str, max_tokens: int, **input: Any) -> dict[str, Any]:
    return {"type": "generate", "request_id": request_id, "input": input or {"prompt": "Hello there, worker"},
            "params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip


def _stream(cp: ControlPlane, worker_id: str, request_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The token messages and the final done/error of one request (others' messages stay queued)."""
    tokens: list[dict[str, Any]] = []
    while True:
        message = cp.recv(worker_id, request_id)
        if message["type"] != "token":
            return tokens, message
        tokens.append(message)


@pytest.fixture(scope="module")
def main(cp: ControlPlane, procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    hello = cp.handshake("main")
    cp.beating.add("main")
    return hello


def test_hello_describes_the_worker(main: dict[str, Any], procs: dict[str, subprocess.Popen[bytes]]) -> None:
    assert main["worker_id"] == "main" and main["pid"] == procs["main"].pid
    assert (main["engine"], main["model"], main["backend"], main["device"]) == (
        "hf",
        "tiny-random",
        "stock",
        "cpu",
    )
    assert main["capabilities"] == {
        "max_context": 8192,
        "max_inflight": 2,
        "method": None,
        "chat_template": True,
    }


def test_streaming_generate(cp: ControlPlane, main: dict[str, Any]) -> None:
    cp.send("main", _generate("s1", 8, token_ids=[100, 200, 300, 400, 500]))
    tokens, done = _stream(cp, "main", "s1")
    assert [t["index"] for t in tokens] == list(range(8))
    assert sum(len(t["token_ids"]) for t in tokens) == 8
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 8}
    assert done["kv_bytes"] == done["full_kv_bytes"] == 5 * TINY_KV_BYTES_PER_TOKEN
    assert cp.worker_heartbeats.get("main", 0) >= 1


def test_logprobs_arrive_as_a_tensor_frame(cp: ControlPlane, main: dict[str, Any]) -> None:
    request = _generate("lp", 3)
    request["params"]["logprobs"] = True
    cp.send("main", request)
    tokens, done = _stream(cp, "main", "lp")
    assert done["type"] == "done"
    assert all(t["logprobs"].dtype == "float32" and t["logprobs"].shape == (1,) for t in tokens)


def test_cancel_during_generation(cp: ControlPlane, main: dict[str, Any]) -> None:
    cp.send("main", _generate("c1", 4000))
    first = cp.recv("main", "c1")
    assert first["type"] == "token" and first["request_id"] == "c1"
    cp.send("main", {"type": "cancel", "request_id": "c1"})
    tokens, done = _stream(cp, "main", "c1")
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] == len(tokens) + 1 < 4000


def test_malformed_frames_get_errors_and_the_worker_keeps_serving(
    cp: ControlPlane, main: dict[str, Any]
) -> None:
    bad = [
        (b"\xc1",),  # not msgpack
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "explode"}),),
        (
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "type": "generate",
                    "request_id": "m1",
                    "input": {"prompt": "x"},
                    "params": {"max_tokens": "ten"},
                }
            ),
        ),  # fmt: skip
        tuple(
            encode({"type": "token", "request_id": "m2", "index": 0, "text": "", "token_ids": []})
        ),  # W->C type
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "cancel", "request_id": "m3"}), b"stray frame"),
        (msgpack.packb({"v": 99, "type": "cancel", "request_id": "m4"}),),
    ]
    for frames in bad:
        cp.send_raw("main", *frames)
    errors = [cp.recv("main") for _ in bad]
    assert [e["type"] for e in errors] == ["error"] * len(bad)
    assert [e["code"] for e in errors] == ["bad_message"] * 5 + ["protocol_version"]
    assert [e["request_id"] for e in errors] == [None, None, "m1", "m2", "m3", "m4"]
    cp.send("main", _generate("after", 2))
    _, done = _stream(cp, "main", "after")
    assert done["type"] == "done" and "Traceback" not in cp.log_of("main")


def test_invalid_requests_end_with_request_errors(cp: ControlPlane, main: dict[str, Any]) -> None:
    cp.send("main", _generate("oov", 2, token_ids=[1, 10**7]))
    cp.send("main", _generate("huge", 8190, prompt="The quick brown fox jumps over the lazy dog"))
    errors = {m["request_id"]: m for m in (cp.recv("main"), cp.recv("main"))}
    assert errors["oov"]["code"] == "bad_request" and errors["huge"]["code"] == "context_too_long"


def test_concurrent_requests_and_stats(cp: ControlPlane, main: dict[str, Any]) -> None:
    cp.send("main", {"type": "stats_request", "nonce": 1})
    before = cp.recv("main")
    cp.send("main", _generate("a", 5))
    cp.send("main", _generate("b", 7))
    cp.send("main", _generate("c", 3))  # max_inflight is 2
    results = {}
    for rid in ("c", "a", "b"):
        results[rid] = _stream(cp, "main", rid)
    assert results["c"][1]["code"] == "overloaded"
    assert [len(results[r][0]) for r in ("a", "b")] == [5, 7]
    cp.send("main", {"type": "stats_request", "nonce": 2**40})
    after = cp.recv("main")
    assert after["type"] == "stats" and after["nonce"] == 2**40 and after["worker_id"] == "main"
    assert after["tokens_generated_total"] - before["tokens_generated_total"] == 12
    assert after["requests_total"] - before["requests_total"] == 2
    assert after["inflight"] == 0 and after["kv_bytes"] == 0 and after["kv_bytes_peak"] > 0
    assert after["engine"]["decode_tokens"] > 0


def test_shutdown_cancels_running_requests_and_exits_0(
    cp: ControlPlane, main: dict[str, Any], procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    cp.send("main", _generate("z", 4000))
    assert cp.recv("main", "z")["type"] == "token"
    cp.send("main", {"type": "shutdown", "reason": "test over"})
    _, done = _stream(cp, "main", "z")
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert cp.wait_exit(procs["main"], 30) == 0
    cp.beating.discard("main")


def test_worker_exits_after_three_missed_heartbeats(
    cp: ControlPlane, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    cp.handshake("orphan", heartbeat_ms=200)  # and never send it a heartbeat
    start = time.monotonic()
    assert cp.wait_exit(procs["orphan"], 30) == 1
    assert time.monotonic() - start >= 0.6
    assert "3 missed" in cp.log_of("orphan")


def test_sigterm_is_a_clean_shutdown(cp: ControlPlane, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    cp.handshake("sigterm")
    cp.beating.add("sigterm")
    cp.send("sigterm", _generate("t", 4000))
    assert cp.recv("sigterm", "t")["type"] == "token"
    os.kill(procs["sigterm"].pid, signal.SIGTERM)
    _, done = _stream(cp, "sigterm", "t")
    assert done["finish_reason"] == "cancelled"
    assert cp.wait_exit(procs["sigterm"], 30) == 0
    cp.beating.discard("sigterm")


def test_protocol_version_mismatch_exits_3(
    cp: ControlPlane, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    assert cp.recv("version", timeout_s=START_TIMEOUT_S)["type"] == "hello"
    cp.send_raw(
        "version", msgpack.packb({"v": 2, "type": "ready", "worker_id": "version", "heartbeat_ms": 1000})
    )
    assert cp.wait_exit(procs["version"], 30) == 3
    assert f"speaks version {PROTOCOL_VERSION}" in cp.log_of("version")


def test_curve_key_files_are_zeromq_certificates(tmp_path: Path) -> None:
    import zmq.auth

    from mosaickv.worker.__main__ import _curve_keys

    server_public_file, _ = zmq.auth.create_certificates(tmp_path, "server")
    client_public_file, client_secret_file = zmq.auth.create_certificates(tmp_path, "client")
    keys = _curve_keys(Path(server_public_file), Path(client_secret_file))
    assert keys is not None
    assert keys.server_public == zmq.auth.load_certificate(server_public_file)[0]
    assert (keys.client_public, keys.client_secret) == zmq.auth.load_certificate(client_secret_file)
    with pytest.raises(ValueError, match="secret"):
        _curve_keys(Path(server_public_file), Path(client_public_file))
    with pytest.raises(ValueError, match="both"):
        _curve_keys(Path(server_public_file), None)
