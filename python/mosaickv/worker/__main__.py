"""``python -m mosaickv.worker --connect URL --worker-id ID --engine hf --backend stock --model M``

Loads the engine, connects to the control plane, sends `hello`, serves until `shutdown`, SIGTERM,
or 3 missed control-plane heartbeats. Exit codes: 0 clean shutdown; 1 control plane lost or never
answered; 2 invalid flags or an engine/backend that cannot run here; 3 protocol version mismatch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mosaickv.engines.base import Engine
from mosaickv.protocol import MosaicError

from .server import CurveKeys, Worker

log = logging.getLogger("mosaickv.worker")

ENGINES = ("hf", "vllm", "sglang")
BACKENDS = ("stock", "mosaickv", "kvpress")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mosaickv.worker", description=__doc__.splitlines()[0])
    p.add_argument(
        "--connect", required=True, help="control plane ROUTER address: ipc://PATH or tcp://HOST:PORT"
    )
    p.add_argument("--worker-id", required=True, help="this worker's id (also its ZeroMQ routing id)")
    p.add_argument("--engine", choices=ENGINES, default="hf", help="engine hosting the model (default: hf)")
    p.add_argument("--backend", choices=BACKENDS, default="stock", help="KV cache backend (default: stock)")
    p.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend parameter, repeatable (e.g. the mosaickv method and its settings)",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (default, embedded), tiny-random (tests), or a local HF model directory",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--max-inflight", type=int, default=4, help="requests served at once (default: 4)")
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for `ready` after `hello` (default: 60)",
    )
    p.add_argument(
        "--curve-server-key",
        type=Path,
        metavar="FILE",
        help="the control plane's public key (ZeroMQ certificate file); required for tcp://",
    )
    p.add_argument(
        "--curve-client-key",
        type=Path,
        metavar="FILE",
        help="this worker's key pair (ZeroMQ secret certificate file)",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _options(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option {pair!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _curve_keys(server: Path | None, client: Path | None) -> CurveKeys | None:
    if server is None and client is None:
        return None
    if server is None or client is None:
        raise ValueError(
            "CurveZMQ needs both --curve-server-key and --curve-client-key (see `mosaickv keygen`)"
        )
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server)
    client_public, client_secret = zmq.auth.load_certificate(client)
    if client_secret is None:
        raise ValueError(f"{client} holds no secret-key: pass the worker's secret certificate file")
    return CurveKeys(server_public, client_public, client_secret)


def _vllm_engine(model: str, backend: str, device: str, max_inflight: int, options: dict[str, str]) -> Engine:
    try:
        from mosaickv.engines.vllm.engine import VLLMEngine
    except ImportError as exc:
        raise MosaicError(
            "unsupported",
            f"engine vllm needs vLLM 0.33.0 ({exc}); run the worker with its environment's python: "
            "npm run setup:vllm, then ~/.cache/mosaickv/venv-vllm-0.33.0/bin/python -m mosaickv.worker ...",
        ) from exc
    return VLLMEngine(model, backend, device, max_inflight, options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s worker {args.worker_id} %(levelname)s %(message)s",
    )
    try:
        if args.max_inflight < 1:
            raise ValueError(f"--max-inflight must be >= 1, got {args.max_inflight}")
        if args.connect.startswith("tcp://") and args.curve_server_key is None:
            log.warning(
                "connecting over tcp:// without CurveZMQ keys: the control plane will refuse this "
                "worker unless it runs without CURVE; pass --curve-server-key/--curve-client-key"
            )
        curve = _curve_keys(args.curve_server_key, args.curve_client_key)
        options = _options(args.backend_option)
        if args.engine == "sglang":
            raise MosaicError(
                "unsupported", "engine 'sglang' is not served by this worker yet; use --engine hf or vllm"
            )
        log.info(
            "loading model %s on %s (engine %s, backend %s)",
            args.model,
            args.device,
            args.engine,
            args.backend,
        )
        if args.engine == "vllm":
            engine = _vllm_engine(args.model, args.backend, args.device, args.max_inflight, options)
        else:
            from mosaickv.engines.hf.engine import HFEngine

            engine = HFEngine(args.model, args.backend, args.device, args.max_inflight, options)
        log.info("model loaded in %.1f s", engine.load_ms / 1000)
    except (ValueError, OSError, RuntimeError, MosaicError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    return Worker(args.connect, args.worker_id, engine, args.handshake_timeout, curve).run()


if __name__ == "__main__":
    sys.exit(main())
