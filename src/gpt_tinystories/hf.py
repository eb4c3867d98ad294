"""Hugging Face transformers interop. Imported only when asked for: transformers is heavy."""

from __future__ import annotations

import torch

from .model import GPT


def to_transformers(model: GPT):
    """The same network as a transformers `GPT2LMHeadModel` (weights copied; Conv1D layers store (in, out))."""
    import transformers

    config = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}  # fmt: skip
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            state[f"{prefix}{name}.weight"] = getattr(block, name).weight
            state[f"{prefix}{name}.bias"] = getattr(block, name).bias
        linears = {"attn.c_attn": block.attn.qkv, "attn.c_proj": block.attn.proj,
                   "mlp.c_fc": block.mlp.up, "mlp.c_proj": block.mlp.down}  # fmt: skip
        for name, linear in linears.items():
            state[f"{prefix}{name}.weight"] = linear.weight.T
            state[f"{prefix}{name}.bias"] = linear.bias
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight mapping out of date: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.wte.weight.device).eval()
