"""Run as a script by test_telemetry.py, standing in for vLLM's engine-core process: builds two real
vLLM Attention layers on the MosaicKV backend (settings and MOSAICKV_TELEMETRY_ADDR from the
environment it inherits) and runs ``PROMPTS`` prefills through both, one request per step, then
``DECODE_STEPS`` decode steps of prompt 0's request.

``inputs`` / ``decode_inputs`` give the seeded Q/K/V of every (prompt or step, layer), so the test
can recompute what the engine core measured."""

import sys

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from mosaickv.engines.vllm.backend import MosaicKVAttentionBackend, MosaicKVMetadataBuilder

H_Q, H_KV, D, BLOCK = 8, 2, 64, 16
PROMPTS = (96, 40, 130)  # prompt lengths, one request each
DECODE_STEPS = 4
N_LAYERS = 2


def inputs(prompt: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H_Q, D], k, v [T, H_KV, D] of prompt ``prompt`` in layer ``layer``."""
    g = torch.Generator().manual_seed(1000 * prompt + layer)
    t = PROMPTS[prompt]
    return (torch.randn(t, H_Q, D, generator=g), torch.randn(t, H_KV, D, generator=g),
            torch.randn(t, H_KV, D, generator=g))


def decode_inputs(step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, H_Q, D], k, v [1, H_KV, D] of decode step ``step`` of prompt 0 in layer ``layer``."""
    g = torch.Generator().manual_seed(10**6 + 1000 * step + layer)
    return (torch.randn(1, H_Q, D, generator=g), torch.randn(1, H_KV, D, generator=g),
            torch.randn(1, H_KV, D, generator=g))


def metadata(cached: int, new: int, block: int) -> CommonAttentionMetadata:
    """One request in its own blocks from ``block`` on, ``cached`` tokens held, ``new`` this step."""
    t = cached + new
    qsl = torch.tensor([0, new], dtype=torch.int32)
    table = torch.arange(block, block + -(-t // BLOCK), dtype=torch.int32)[None]
    pos = torch.arange(cached, t)
    slots = (table[0, pos // BLOCK] * BLOCK + pos % BLOCK).long()
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([t], dtype=torch.int32),
        num_reqs=1, num_actual_tokens=new, max_query_len=new, max_seq_len=t, block_table_tensor=table,
        slot_mapping=slots)


def main() -> None:
    config = VllmConfig()
    with set_current_vllm_config(config):
        layers = [Attention(H_Q, D, D**-0.5, num_kv_heads=H_KV, prefix=f"model.layers.{i}.attn",
                            attn_backend=MosaicKVAttentionBackend) for i in range(N_LAYERS)]
    spec = MosaicKVAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_KV, head_size=D, dtype=torch.float32))
    builder = MosaicKVMetadataBuilder(spec, [layer.layer_name for layer in layers], config,
                                      torch.device("cpu"))
    def step(cached: int, new: int, block: int, qkv) -> None:  # noqa: ANN001
        cm = metadata(cached, new, block)
        md = builder.build(0, cm)
        with set_forward_context({layer.layer_name: md for layer in layers}, config):
            for i, layer in enumerate(layers):
                q, k, v = qkv(i)
                out = torch.empty(new, H_Q * D)
                layer.impl.do_kv_cache_update(layer, k, v, torch.empty(0), cm.slot_mapping)
                layer.impl.forward(layer, q, k, v, torch.empty(0), md, out)
                assert torch.isfinite(out).all()

    for p, t in enumerate(PROMPTS):
        step(0, t, 10 * (p + 1), lambda i, p=p: inputs(p, i))
    for s in range(DECODE_STEPS):
        step(PROMPTS[0] + s, 1, 10, lambda i, s=s: decode_inputs(s, i))
    print("steps done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
