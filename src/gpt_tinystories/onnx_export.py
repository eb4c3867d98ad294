"""Export to ONNX with a KV cache, for onnxruntime (and onnxruntime-genai, transformers.js in a browser).

The graph has the inputs and outputs those runtimes expect of a decoder with past keys and values:

    input_ids (batch, sequence) int64, attention_mask (batch, past + sequence) int64,
    position_ids (batch, sequence) int64, past_key_values.N.key / .value (batch, kv_heads, past, head_size)
    -> logits (batch, sequence, vocab), present.N.key / .value (batch, kv_heads, past + sequence, head_size)

It is traced from our own model by `torch.onnx.export` (the torch.export-based exporter), through a cache
object that concatenates past and new keys instead of writing into a preallocated buffer: the same modules,
so every variant but GPT-Neo's local attention windows exports, not only those transformers has a class for.

Beside the graph: tokenizer.json, and genai_config.json with tokenizer_config.json, with which onnxruntime-genai
loads the folder as it is (`onnxruntime_genai.Model(folder)`) and decodes greedily by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import staging_dir
from .config import ModelConfig
from .errors import UserError
from .model import GPT
from .tokenizer import EOS, Tokenizer

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
OPSET = 18


def unsupported(config: ModelConfig) -> str | None:
    """Why this exporter cannot trace the model (None when it can)."""
    if config.local_layers:
        return "local attention windows (GPT-Neo) change shape with the sequence length, which the graph cannot"
    return None


class _PastCache:
    """Duck-types model.KVCache for one forward pass: new keys and values are appended to the given past ones
    (ONNX graphs are functional: no buffer is written in place), and the results are kept as the `present`."""

    def __init__(self, past: list[torch.Tensor], attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        self.past, self.present = past, []
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.length = 0  # GPT.hidden_states checks length + time against the context; past is unknown here
        self.mask: torch.Tensor | None = None
        self.causal = False

    def begin(self, time: int) -> torch.Tensor:
        total = self.attention_mask.shape[1]
        keys = torch.arange(total, device=self.attention_mask.device)
        queries = torch.arange(time, device=keys.device)[:, None] + (total - time)  # (a slice would size by value)
        mask = (keys[None, :] <= queries) & self.attention_mask.bool()[:, None, None, :]
        # each position sees itself: a padding row then has one finite score, not a softmax of all -inf (NaN)
        self.mask = mask | (keys[None, :] == queries)
        return self.position_ids

    def advance(self, time: int) -> None:  # nothing to count: the next call gets its past as an input
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class WithPast(nn.Module):
    """The model as a function of (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        cache = _PastCache(past, attention_mask, position_ids)
        return (self.model(input_ids, cache), *cache.present)


def genai_config(config: ModelConfig, eos_id: int) -> dict:
    """onnxruntime-genai's description of the folder: the graph's input and output names and the model's sizes.
    "llama" is the type of its generic decoder with a KV cache, which feeds the graph by these names and computes
    nothing itself (its "gpt2" type expects GPT-2's older stacked past); our present holds past + new keys, so
    past and present cannot share one buffer."""
    context = config.context_length
    return {
        "model": {
            "type": "llama",
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,  # a story starts after EOS
            "context_length": context, "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_size, "hidden_size": config.d_model, "num_attention_heads": config.n_head,
                "num_hidden_layers": config.n_layer, "num_key_value_heads": config.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "num_return_sequences": 1},
    }  # fmt: skip


def io_names(config: ModelConfig) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(config.n_layer) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(config.n_layer) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike) -> Path:
    """Write `out`/model.onnx, tokenizer.json and onnxruntime-genai's two configs (into a temporary folder, then
    renamed)."""
    out = Path(out)
    config = model.config
    if reason := unsupported(config):
        raise UserError(f"ONNX export: {reason}")
    with staging_dir(out) as tmp:  # a crash or a full disk leaves no half-written folder behind
        _trace(model.eval(), tmp / MODEL_FILE)
        tokenizer.save(tmp)
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(config, tokenizer.eos_id), indent=2) + "\n")
        special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "add_bos_token": False}
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.context_length, **special}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def _trace(model: GPT, path: Path) -> None:
    import contextlib
    import io
    import logging
    import warnings

    config = model.config
    batch, time, past = 2, 3, 4  # not 0 or 1: the exporter would take those sizes for constants
    shape = (batch, config.kv_heads, past, config.head_size)
    inputs = (
        torch.zeros(batch, time, dtype=torch.long),
        torch.ones(batch, past + time, dtype=torch.long),
        torch.arange(past, past + time).repeat(batch, 1),
        [torch.zeros(shape) for _ in range(2 * config.n_layer)],
    )
    names_in, names_out = io_names(config)
    auto = torch.export.Dim.AUTO  # batch and lengths: the exporter finds which sizes are tied together
    dims = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, [{0: auto, 2: auto}] * (2 * config.n_layer))
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes about its own internals are not for our users
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(WithPast(model), inputs, str(path), input_names=names_in, output_names=names_out,
                              dynamic_shapes=dims, opset_version=OPSET, dynamo=True, external_data=False,
                              verbose=False)  # fmt: skip
    finally:
        quiet.setLevel(level)
