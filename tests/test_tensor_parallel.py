"""Tensor parallelism on the CPU: two processes (gloo) shard a small Llama with transformers'
`tp_plan="auto"`, and greedy generation with each tidal setting gives the tokens of one process
alone: budget >= length the dense tokens, budget < length those of the single-process tidal run
(query_head, kv_head and Quest select per rank, with no communication; KV-cache correction
recomputes each rank's heads). Granularity `layer`
is rejected with a clear error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import tp_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _small_llama(folder: Path) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_generate_the_tokens_of_one_process(tmp_path):
    model_dir = _small_llama(tmp_path / "model")
    out = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), tp_worker.__file__, model_dir, str(out)]
    ranks = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    alone = tp_worker.generate_all(model_dir)  # meanwhile, in this process
    log, _ = ranks.communicate(timeout=600)
    assert ranks.returncode == 0, log[-4000:]
    sharded = json.loads(out.read_text())

    tokens, expected = sharded["tokens"], alone["tokens"]
    assert tokens["dense"] == expected["dense"]
    assert tokens["tidal:64"] == expected["dense"], "budget >= length: dense attention's tokens"
    assert expected["tidal:8"] != expected["dense"], "the small budget must change the tokens, or this proves nothing"
    for name in ("tidal:8", "tidal:8:kv_head", "tidal:8:correction", "quest:16"):
        assert tokens[name] == expected[name], name
    assert sharded["corrections"]["tidal:8:correction"] == alone["corrections"]["tidal:8:correction"] >= 2
    assert sharded["corrections"]["tidal:8"] == 0
    assert "tensor parallel: rank 0 of 2; every layer here holds query heads 0-1 of 4 and KV head 0 of 2" \
        in sharded["report"]
    assert "1 sparse" in sharded["report"]
    assert "granularity 'layer'" in sharded["layer_error"] and "query_head or kv_head" in sharded["layer_error"]
    assert alone["layer_error"] is None, "one process holds every head: layer granularity is fine there"
