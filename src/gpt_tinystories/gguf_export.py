"""Export to GGUF, the file format of llama.cpp (and of ollama, LM Studio, ... that run on it).

A GPT-2-shaped model becomes llama.cpp's `gpt2` architecture, one with rotary positions its `gptneox`
architecture (sequential residuals, whole heads rotated), a Llama-shaped one (rotary, RMSNorm, SwiGLU) its
`llama` architecture, each with its byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`): vocabulary,
merges, token types and EOS. Weights are written as f32, f16 or q8_0 (8-bit blocks of 32 with one f16
scale, llama.cpp's near-lossless quantization) through the `gguf` package that llama.cpp itself maintains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .atomic import replacing
from .config import ModelConfig
from .errors import UserError
from .model import GPT
from .tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")


def unsupported(config: ModelConfig) -> str | None:
    """Why llama.cpp cannot run this model (None when it can)."""
    from .hf import architecture

    try:
        kind = architecture(config)
    except UserError:
        kind = None
    if kind == "gpt_neo":
        return "GPT-Neo's attention (unscaled, or local layers) is in no llama.cpp architecture"
    if kind is None:
        return "llama.cpp's gpt2, gptneox and llama architectures have no such variant"
    if kind == "gpt2" and config.kv_heads != config.n_head:
        return "grouped-query attention with GPT-2's learned positions is not what llama.cpp's gpt2 loads"
    return None


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, outtype: str = "f32") -> Path:
    """Write `model` and `tokenizer` as one GGUF file at `out` (written to a temporary name, then renamed)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"GGUF type must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    from .hf import architecture

    if reason := unsupported(model.config):
        raise UserError(f"GGUF export: {reason}")
    out = Path(out)
    arch = {"llama": "llama", "gpt_neox": "gptneox"}.get(architecture(model.config), "gpt2")
    out.parent.mkdir(parents=True, exist_ok=True)  # as the folder exports do
    with replacing(out) as tmp:  # a crash or a full disk leaves no half-written file behind
        _write(gguf.GGUFWriter(tmp, arch), model, tokenizer, arch, outtype)
    return out


def _write(writer, model: GPT, tokenizer: Tokenizer, arch: str, outtype: str) -> None:
    merges, tokens, types = _vocabulary(tokenizer)
    _hyperparameters(writer, model.config, arch, outtype)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # our BPE splits text with GPT-2's regex before merging
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    for setter in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        setter(tokenizer.eos_id)  # a story starts after EOS, as our prompts do
    writer.add_add_bos_token(False)  # the caller puts EOS first itself, as encode_prompt() does
    for name, tensor in _tensors(model, arch):
        data, qtype = _encode(name, tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _hyperparameters(writer, config: ModelConfig, arch: str, outtype: str) -> None:
    import gguf

    writer.add_name("gpt-tinystories")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(1e-5)
    else:
        writer.add_layer_norm_eps(1e-5)
    if arch != "gpt2":
        writer.add_rope_dimension_count(config.head_size)
        writer.add_rope_freq_base(config.rope_theta)
    if arch == "gptneox":
        writer.add_parallel_residual(False)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[str], list[int]]:
    """Merges, tokens (in id order, in the byte-to-character form of GPT-2's vocab.json) and token types."""
    import gguf
    from tokenizers import decoders, pre_tokenizers

    state = json.loads(tokenizer.backend.to_str())
    backend = tokenizer.backend
    if (
        state["model"]["type"] != "BPE"
        or not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
        or not isinstance(backend.decoder, decoders.ByteLevel)
    ):
        raise UserError(f"tokenizer {tokenizer.name} is not a byte-level BPE; GGUF export needs GPT-2-style BPE")
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * tokenizer.vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["id"] for added in state.get("added_tokens", []) if added.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    # tokenizer.json holds merges as "a b" strings (older files) or as [a, b] pairs (newer ones)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return merges, tokens, [int(t) for t in types]


def _tensors(model: GPT, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """llama.cpp's tensor names with our weights, as (out, in) matrices like nn.Linear's."""
    config = model.config
    yield "token_embd.weight", model.wte.weight
    if arch == "gpt2":
        yield "position_embd.weight", model.wpe.weight
    yield "output_norm.weight", model.ln_f.weight
    if getattr(model.ln_f, "bias", None) is not None:
        yield "output_norm.bias", model.ln_f.bias
    # written even when tied: every llama.cpp version loads an explicit output matrix
    yield "output.weight", model.head_weight
    for i, block in enumerate(model.blocks):
        if arch != "llama":  # llama.cpp's gptneox keeps q|k|v fused as ours, and rotates halves as ours
            yield from _gpt2_block(f"blk.{i}.", block)
        else:
            yield from _llama_block(f"blk.{i}.", block, config)


def _gpt2_block(prefix: str, block) -> Iterator[tuple[str, torch.Tensor]]:
    for ours, theirs in ((block.ln_1, "attn_norm"), (block.ln_2, "ffn_norm")):
        yield f"{prefix}{theirs}.weight", ours.weight
        yield f"{prefix}{theirs}.bias", ours.bias
    for ours, theirs in ((block.attn.qkv, "attn_qkv"), (block.attn.proj, "attn_output"),
                         (block.mlp.up, "ffn_up"), (block.mlp.down, "ffn_down")):  # fmt: skip
        yield f"{prefix}{theirs}.weight", ours.weight
        yield f"{prefix}{theirs}.bias", ours.bias


def _llama_block(prefix: str, block, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    q_size, kv_size, hidden = config.d_model, config.kv_heads * config.head_size, config.mlp_hidden
    yield f"{prefix}attn_norm.weight", block.ln_1.weight
    yield f"{prefix}ffn_norm.weight", block.ln_2.weight
    qkv, up = block.attn.qkv, block.mlp.up
    pieces = {
        "attn_q": (qkv, 0, q_size, config.n_head),
        "attn_k": (qkv, q_size, q_size + kv_size, config.kv_heads),
        "attn_v": (qkv, q_size + kv_size, q_size + 2 * kv_size, None),
        "attn_output": (block.attn.proj, 0, config.d_model, None),
        "ffn_gate": (up, 0, hidden, None),  # our `up` holds SwiGLU's gate, then its value
        "ffn_up": (up, hidden, 2 * hidden, None),
        "ffn_down": (block.mlp.down, 0, config.d_model, None),
    }
    for name, (linear, start, end, heads) in pieces.items():
        yield f"{prefix}{name}.weight", _interleave(linear.weight[start:end], heads)
        if linear.bias is not None:
            yield f"{prefix}{name}.bias", _interleave(linear.bias[start:end], heads)


def _interleave(rows: torch.Tensor, heads: int | None) -> torch.Tensor:
    """Reorder each head's query/key rows from the rotate-half layout (ours, transformers') to the interleaved
    pairs that llama.cpp's llama architecture rotates (what llama.cpp's own converter does)."""
    if heads is None:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """The tensor's bytes in the requested type: 1-D tensors (norms, biases) always stay f32, as in llama.cpp's
    own files, and q8_0 needs rows that are whole blocks of 32 (else f16 keeps the precision close)."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType.F32
    if data.ndim == 2 and outtype != "f32":
        qtype = gguf.GGMLQuantizationType.F16
        if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype
