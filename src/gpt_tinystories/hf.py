"""Hugging Face transformers interop: export to GPT2LMHeadModel, GPTNeoForCausalLM or LlamaForCausalLM (for
the rotary + RMSNorm + SwiGLU variant); import from GPT-2 or GPT-Neo.

GPT-Neo is the architecture of the TinyStories paper's models (roneneldan/TinyStories-1M ... 33M): like GPT-2
but without attention scaling, with every other layer attending to the last 256 positions only, and with
separate bias-free q, k, v projections. Our model holds both (see ModelConfig). transformers is heavy, so
this module is imported only when asked for.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import ModelConfig
from .data import hub_reachable
from .errors import UserError, write_error
from .model import GPT
from .tokenizer import EOS, Tokenizer

SUPPORTED = ("gpt2", "gpt_neo")


def _is_neo(config: ModelConfig) -> bool:
    return config.attn_scale is not None or bool(config.local_layers)


# The variant fields, with the values that GPT-2 (and GPT-Neo) have and that Llama has.
_GPT2_VARIANTS = {"position": "learned", "norm": "layernorm", "activation": "gelu_tanh", "n_kv_head": None,
                  "qk_norm": False, "parallel_blocks": False, "bias": True}  # fmt: skip
_LLAMA_VARIANTS = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "qk_norm": False,
                   "parallel_blocks": False, "attn_scale": None, "local_layers": ()}  # fmt: skip


def architecture(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly this model: gpt2, gpt_neo or llama."""
    values = config.to_dict() | {"n_kv_head": None if config.kv_heads == config.n_head else config.n_kv_head}
    gpt2_misses = [name for name, value in _GPT2_VARIANTS.items() if values[name] != value]
    if not gpt2_misses:
        return "gpt_neo" if _is_neo(config) else "gpt2"
    if all(values[name] == value for name, value in _LLAMA_VARIANTS.items()):
        return "llama"
    differences = ", ".join(f"{name}={values[name]!r}" for name in gpt2_misses)
    raise UserError(
        f"transformers has no architecture for this model ({differences}): GPT-2 needs the default variants, Llama "
        "needs position=rope, norm=rmsnorm, activation=swiglu, without qk_norm or parallel_blocks"
    )


def to_transformers(model: GPT):
    """The same network as a transformers model: GPT2LMHeadModel, GPTNeoForCausalLM or LlamaForCausalLM."""
    import transformers

    config = model.config
    kind = architecture(config)
    if kind == "llama":
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.mlp_hidden,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_size,
            max_position_embeddings=config.context_length,
            rms_norm_eps=1e-5,
            rope_theta=config.rope_theta,
            attention_bias=config.bias,
            mlp_bias=config.bias,
            tie_word_embeddings=config.tied_embeddings,
            attention_dropout=config.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )
        hf = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa")
        return _load(hf, _llama_state(model), model)
    state: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": model.ln_f.bias,
    }
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    if kind == "gpt_neo":
        if config.attn_scale != 1.0:
            raise UserError(f"attention scale {config.attn_scale} exists in neither GPT-2 nor GPT-Neo; cannot export")
        if any(bool(block.attn.qkv.bias.detach().any()) for block in model.blocks):
            raise UserError("GPT-Neo has no q/k/v biases, and this model's are not zero; cannot export to GPT-Neo")
        layers = ["local" if i in config.local_layers else "global" for i in range(config.n_layer)]
        hf_config = transformers.GPTNeoConfig(
            vocab_size=config.vocab_size,
            max_position_embeddings=config.context_length,
            hidden_size=config.d_model,
            num_layers=config.n_layer,
            num_heads=config.n_head,
            attention_types=[[[layer], 1] for layer in layers],
            window_size=config.local_window or 256,
            activation_function="gelu_new",
            resid_dropout=config.dropout,
            embed_dropout=config.dropout,
            attention_dropout=config.dropout,
            tie_word_embeddings=config.tied_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )
        hf = transformers.GPTNeoForCausalLM(hf_config)
        for i, block in enumerate(model.blocks):
            prefix = f"transformer.h.{i}."
            q, k, v = block.attn.qkv.weight.chunk(3)
            state |= {
                prefix + "attn.attention.q_proj.weight": q,
                prefix + "attn.attention.k_proj.weight": k,
                prefix + "attn.attention.v_proj.weight": v,
                prefix + "attn.attention.out_proj.weight": block.attn.proj.weight,
                prefix + "attn.attention.out_proj.bias": block.attn.proj.bias,
            }
            state |= _norms_and_mlp(prefix, block, transpose=False)
    else:
        hf_config = transformers.GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.d_model,
            n_layer=config.n_layer,
            n_head=config.n_head,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            tie_word_embeddings=config.tied_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )
        hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
        for i, block in enumerate(model.blocks):
            prefix = f"transformer.h.{i}."
            # transformers' GPT-2 uses Conv1D layers, which store weights as (in, out)
            state |= {
                prefix + "attn.c_attn.weight": block.attn.qkv.weight.T,
                prefix + "attn.c_attn.bias": block.attn.qkv.bias,
                prefix + "attn.c_proj.weight": block.attn.proj.weight.T,
                prefix + "attn.c_proj.bias": block.attn.proj.bias,
            }
            state |= _norms_and_mlp(prefix, block, transpose=True)
    return _load(hf, state, model)


def _load(hf, state: dict[str, torch.Tensor], model: GPT):
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if model.config.tied_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"weight mapping out of date: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.wte.weight.device).eval()


def _llama_state(model: GPT) -> dict[str, torch.Tensor]:
    config = model.config
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    kv = config.kv_heads * config.head_size
    for i, block in enumerate(model.blocks):
        prefix, attn, mlp = f"model.layers.{i}.", block.attn, block.mlp
        linears = {
            "self_attn.q_proj": (attn.qkv, 0, config.d_model),
            "self_attn.k_proj": (attn.qkv, config.d_model, config.d_model + kv),
            "self_attn.v_proj": (attn.qkv, config.d_model + kv, config.d_model + 2 * kv),
            "self_attn.o_proj": (attn.proj, 0, config.d_model),
            "mlp.gate_proj": (mlp.up, 0, config.mlp_hidden),  # our `up` holds gate, then value
            "mlp.up_proj": (mlp.up, config.mlp_hidden, 2 * config.mlp_hidden),
            "mlp.down_proj": (mlp.down, 0, config.d_model),
        }
        for name, (linear, start, end) in linears.items():
            state[f"{prefix}{name}.weight"] = linear.weight[start:end]
            if linear.bias is not None:
                state[f"{prefix}{name}.bias"] = linear.bias[start:end]
        state[prefix + "input_layernorm.weight"] = block.ln_1.weight
        state[prefix + "post_attention_layernorm.weight"] = block.ln_2.weight
    return state


def _norms_and_mlp(prefix: str, block: torch.nn.Module, transpose: bool) -> dict[str, torch.Tensor]:
    def weight(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.T if transpose else linear.weight

    return {
        prefix + "ln_1.weight": block.ln_1.weight,
        prefix + "ln_1.bias": block.ln_1.bias,
        prefix + "ln_2.weight": block.ln_2.weight,
        prefix + "ln_2.bias": block.ln_2.bias,
        prefix + "mlp.c_fc.weight": weight(block.mlp.up),
        prefix + "mlp.c_fc.bias": block.mlp.up.bias,
        prefix + "mlp.c_proj.weight": weight(block.mlp.down),
        prefix + "mlp.c_proj.bias": block.mlp.down.bias,
    }


def from_transformers(hf) -> GPT:
    """Our model with the weights of a transformers GPT-2 or GPT-Neo causal LM."""
    hf_config = hf.config
    if hf_config.model_type == "gpt2":
        config = ModelConfig(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.n_embd,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            context_length=hf_config.n_positions,
        )
    elif hf_config.model_type == "gpt_neo":
        local = tuple(i for i, kind in enumerate(hf_config.attention_layers) if kind == "local")
        config = ModelConfig(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.hidden_size,
            n_layer=hf_config.num_layers,
            n_head=hf_config.num_heads,
            context_length=hf_config.max_position_embeddings,
            attn_scale=1.0,
            local_window=hf_config.window_size if local else None,
            local_layers=local,
        )
    else:
        raise UserError(f"unsupported architecture {hf_config.model_type!r}; supported: {', '.join(SUPPORTED)}")
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"unsupported activation {activation!r}; supported: gelu_new, gelu_pytorch_tanh, gelu")
    config = ModelConfig.from_dict({**config.to_dict(), "activation": "gelu" if activation == "gelu" else "gelu_tanh"})
    model = GPT(config)
    source = hf.state_dict()
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in _our_names(source, config).items():
            if target[name].shape != tensor.shape:
                raise UserError(
                    f"tensor {name} has shape {tuple(tensor.shape)} in the transformers model, but the "
                    f"config asks for {tuple(target[name].shape)}; the checkpoint does not match its config"
                )
            target[name].copy_(tensor)
    return model.eval()


def _our_names(source: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in source:
            raise UserError(f"the transformers model has no tensor {name}; it does not match its config")
        return source[name]

    out = {
        "wte.weight": get("transformer.wte.weight"),
        "wpe.weight": get("transformer.wpe.weight"),
        "ln_f.weight": get("transformer.ln_f.weight"),
        "ln_f.bias": get("transformer.ln_f.bias"),
    }
    neo = _is_neo(config)
    for i in range(config.n_layer):
        hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for norm in ("ln_1", "ln_2"):
            out[f"{ours}{norm}.weight"], out[f"{ours}{norm}.bias"] = get(f"{hf}{norm}.weight"), get(f"{hf}{norm}.bias")
        if neo:
            attention = hf + "attn.attention."
            out[ours + "attn.qkv.weight"] = torch.cat([get(attention + f"{p}_proj.weight") for p in "qkv"])
            out[ours + "attn.qkv.bias"] = torch.zeros(3 * config.d_model)
            out[ours + "attn.proj.weight"] = get(attention + "out_proj.weight")
            out[ours + "attn.proj.bias"] = get(attention + "out_proj.bias")
        else:
            out[ours + "attn.qkv.weight"], out[ours + "attn.qkv.bias"] = (
                get(hf + "attn.c_attn.weight").T,
                get(hf + "attn.c_attn.bias"),
            )
            out[ours + "attn.proj.weight"], out[ours + "attn.proj.bias"] = (
                get(hf + "attn.c_proj.weight").T,
                get(hf + "attn.c_proj.bias"),
            )
        for hf_name, name in (("c_fc", "up"), ("c_proj", "down")):
            weight = get(f"{hf}mlp.{hf_name}.weight")
            out[f"{ours}mlp.{name}.weight"] = weight if neo else weight.T  # GPT-2's Conv1D is (in, out)
            out[f"{ours}mlp.{name}.bias"] = get(f"{hf}mlp.{hf_name}.bias")
    return out


def load_pretrained(name: str | os.PathLike) -> tuple[GPT, Tokenizer, dict]:
    """Our model and tokenizer from a transformers directory or hub id (GPT-2 or GPT-Neo)."""
    import transformers

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    if not Path(name).exists() and not offline and not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {name}; pass a local transformers model folder")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load a transformers model from {name}: {str(error).splitlines()[0]}; pass a run "
            "dir, a checkpoint folder, a transformers model folder, or a reachable hub id"
        ) from None
    if hf_config.model_type not in SUPPORTED:
        raise UserError(
            f"unsupported architecture {hf_config.model_type!r} in {name}; supported: {', '.join(SUPPORTED)}"
        )
    _check_shapes(Path(name) / "model.safetensors", hf_config)
    try:
        # weights_only: a pytorch_model.bin is unpickled with tensors-only rules, never as arbitrary objects
        # (torch warns on the way about a pickle protocol its own files never use: the error below says it)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            hf = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"the weights of {name} hold objects other than tensors; refusing to unpickle them") from None
    except (OSError, ValueError, RuntimeError) as error:
        lines = str(error).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "shape" in line), lines[0])
        raise UserError(f"cannot load the weights of {name}: {detail}") from None
    model = from_transformers(hf)
    local = Path(name)
    if not local.exists() or any((local / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        tokenizer = Tokenizer(transformers.AutoTokenizer.from_pretrained(name).backend_tokenizer, str(name))
    elif hf_config.vocab_size == 50257:  # no tokenizer files: GPT-2 and GPT-Neo use GPT-2's
        tokenizer = Tokenizer.gpt2()
    else:
        raise UserError(
            f"{name} has no tokenizer files and a vocabulary of {hf_config.vocab_size}, not GPT-2's; "
            "add its tokenizer.json"
        )
    return model, tokenizer, {"path": str(name), "step": None, "source": "transformers"}


def _check_shapes(weights: Path, hf_config) -> None:
    """Name the first tensor of a local safetensors file whose shape its config contradicts."""
    import transformers
    from safetensors import safe_open

    if not weights.is_file():
        return
    with torch.device("meta"):
        expected = transformers.AutoModelForCausalLM.from_config(hf_config).state_dict()
    with safe_open(str(weights), "pt") as file:
        for name in file.keys():  # noqa: SIM118 - safe_open is not a dict
            shape = tuple(file.get_slice(name).get_shape())
            if name in expected and shape != tuple(expected[name].shape):
                raise UserError(
                    f"tensor {name} in {weights} has shape {shape}, but config.json implies "
                    f"{tuple(expected[name].shape)}; the weights do not match their config"
                )


def export(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike) -> Path:
    """Write a transformers model folder (config, safetensors weights, tokenizer, generation config)."""
    import transformers

    out = Path(out)
    if out.is_symlink():  # the rename below would replace the link, or write where it points
        raise UserError(f"--out {out} is a symlink (to {out.resolve()}); pass a real folder path")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out")
    hf = to_transformers(model)
    eos = tokenizer.eos_id
    hf.config.bos_token_id = hf.config.eos_token_id = eos
    hf.generation_config = transformers.GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=True, temperature=0.8, max_new_tokens=200
    )
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model.config.context_length,
        clean_up_tokenization_spaces=False,
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    transformers.utils.logging.disable_progress_bar()  # its bars on stderr would bury our one-line messages
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer.save_pretrained(tmp)
    except BaseException as error:  # e.g. disk full: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, SafetensorError):  # how safetensors reports a failed write
            raise write_error(error, out) from error
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
