"""Hugging Face transformers interop: export to GPT2LMHeadModel, GPTNeoForCausalLM, GPTNeoXForCausalLM (a GPT-2
block with rotary positions) or LlamaForCausalLM (rotary + RMSNorm + SwiGLU); import from GPT-2, GPT-Neo or such
a GPT-NeoX.

GPT-Neo is the architecture of the TinyStories paper's models (roneneldan/TinyStories-1M ... 33M): like GPT-2
but without attention scaling, with every other layer attending to the last 256 positions only, and with
separate bias-free q, k, v projections. Our model holds both (see ModelConfig). transformers is heavy, so
this module is imported only when asked for.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import atomic, hub
from .config import ModelConfig
from .errors import UserError, write_error
from .model import GPT
from .tokenizer import EOS, Tokenizer

SUPPORTED = ("gpt2", "gpt_neo", "gpt_neox")


def _is_neo(config: ModelConfig) -> bool:
    return config.attn_scale is not None or bool(config.local_layers)


# The variant fields, with the values that GPT-2 (and GPT-Neo) have and that Llama has.
_GPT2_VARIANTS = {"position": "learned", "norm": "layernorm", "activation": "gelu_tanh", "n_kv_head": None,
                  "qk_norm": False, "parallel_blocks": False, "bias": True}  # fmt: skip
_LLAMA_VARIANTS = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "qk_norm": False,
                   "parallel_blocks": False, "attn_scale": None, "local_layers": ()}  # fmt: skip


def architecture(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly this model: gpt2, gpt_neo, gpt_neox or llama."""
    values = config.to_dict() | {"n_kv_head": None if config.kv_heads == config.n_head else config.n_kv_head}
    gpt2_misses = [name for name, value in _GPT2_VARIANTS.items() if values[name] != value]
    if not gpt2_misses:
        return "gpt_neo" if _is_neo(config) else "gpt2"
    if gpt2_misses == ["position"] and config.position == "rope" and not _is_neo(config):
        # GPT-NeoX with sequential residuals and rotation of whole heads is exactly a GPT-2 block with rotary
        # positions (rotate-half layout, as ours)
        return "gpt_neox"
    if all(values[name] == value for name, value in _LLAMA_VARIANTS.items()):
        return "llama"
    differences = ", ".join(f"{name}={values[name]!r}" for name in gpt2_misses)
    raise UserError(
        f"transformers has no architecture for this model ({differences}): GPT-2 needs the default variants "
        "(GPT-NeoX: the same with position=rope), Llama needs position=rope, norm=rmsnorm, activation=swiglu, "
        "without qk_norm or parallel_blocks"
    )


# -- one name table per architecture, read in both directions -------------------------------------------
@dataclass(frozen=True)
class Weight:
    """One of our tensors and the transformers tensor(s) that hold the same numbers."""

    ours: str
    theirs: tuple[str, ...]  # several: ours is their concatenation along dim 0; none: theirs is implicitly zero
    sizes: tuple[int, ...] | None = None  # rows of each of `theirs` in ours (None: equal parts)
    transposed: bool = False  # GPT-2's Conv1D layers store weights as (in, out)
    heads: int | None = None  # GPT-NeoX's fused q, k, v rows go head by head (q, k, v of head 0, ...), ours q|k|v

    def to_theirs(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.T if self.transposed else tensor
        if self.heads:
            tensor = tensor.reshape(3, self.heads, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
        return tensor

    def to_ours(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.heads:
            tensor = tensor.reshape(self.heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
        return tensor.T if self.transposed else tensor


def weight_names(kind: str, config: ModelConfig) -> list[Weight]:
    """Every tensor of our model (config) and where the transformers model of `kind` keeps it."""
    if kind == "llama":
        return _llama_names(config)
    if kind == "gpt_neox":
        return _neox_names(config)
    names = [
        Weight(name, (f"transformer.{name}",)) for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")
    ]
    if not config.tied_embeddings:
        names.append(Weight("lm_head.weight", ("lm_head.weight",)))
    conv1d = kind == "gpt2"
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        names += [
            Weight(f"{ours}{norm}.{p}", (f"{hf}{norm}.{p}",)) for norm in ("ln_1", "ln_2") for p in ("weight", "bias")
        ]
        if conv1d:
            names += [Weight(ours + "attn.qkv.weight", (hf + "attn.c_attn.weight",), transposed=True),
                      Weight(ours + "attn.qkv.bias", (hf + "attn.c_attn.bias",)),
                      Weight(ours + "attn.proj.weight", (hf + "attn.c_proj.weight",), transposed=True),
                      Weight(ours + "attn.proj.bias", (hf + "attn.c_proj.bias",))]  # fmt: skip
        else:  # GPT-Neo: separate bias-free q, k, v projections
            attention = hf + "attn.attention."
            names += [Weight(ours + "attn.qkv.weight", tuple(f"{attention}{p}_proj.weight" for p in "qkv")),
                      Weight(ours + "attn.qkv.bias", ()),
                      Weight(ours + "attn.proj.weight", (attention + "out_proj.weight",)),
                      Weight(ours + "attn.proj.bias", (attention + "out_proj.bias",))]  # fmt: skip
        for theirs, name in (("c_fc", "up"), ("c_proj", "down")):
            names += [Weight(f"{ours}mlp.{name}.weight", (f"{hf}mlp.{theirs}.weight",), transposed=conv1d),
                      Weight(f"{ours}mlp.{name}.bias", (f"{hf}mlp.{theirs}.bias",))]  # fmt: skip
    return names


def _llama_names(config: ModelConfig) -> list[Weight]:
    names = [Weight("wte.weight", ("model.embed_tokens.weight",)), Weight("ln_f.weight", ("model.norm.weight",))]
    if not config.tied_embeddings:
        names.append(Weight("lm_head.weight", ("lm_head.weight",)))
    d, kv = config.d_model, config.kv_heads * config.head_size
    parameters = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        for p in parameters:
            names += [
                Weight(f"{ours}attn.qkv.{p}", tuple(f"{hf}self_attn.{x}_proj.{p}" for x in "qkv"), (d, kv, kv)),
                Weight(f"{ours}attn.proj.{p}", (f"{hf}self_attn.o_proj.{p}",)),
                # our `up` holds the gate, then the value
                Weight(f"{ours}mlp.up.{p}", (f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}")),
                Weight(f"{ours}mlp.down.{p}", (f"{hf}mlp.down_proj.{p}",)),
            ]  # fmt: skip
        names += [Weight(ours + "ln_1.weight", (hf + "input_layernorm.weight",)),
                  Weight(ours + "ln_2.weight", (hf + "post_attention_layernorm.weight",))]  # fmt: skip
    return names


def _neox_names(config: ModelConfig) -> list[Weight]:
    names = [Weight("wte.weight", ("gpt_neox.embed_in.weight",))]
    names += [Weight(f"ln_f.{p}", (f"gpt_neox.final_layer_norm.{p}",)) for p in ("weight", "bias")]
    if not config.tied_embeddings:
        names.append(Weight("lm_head.weight", (_neox_head(),)))
    pairs = (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
             ("attn.qkv", "attention.query_key_value"), ("attn.proj", "attention.dense"),
             ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h"))  # fmt: skip
    for i in range(config.n_layer):
        for ours, theirs in pairs:
            heads = config.n_head if ours == "attn.qkv" else None
            names += [Weight(f"blocks.{i}.{ours}.{p}", (f"gpt_neox.layers.{i}.{theirs}.{p}",), heads=heads)
                      for p in ("weight", "bias")]  # fmt: skip
    return names


def _neox_head() -> str:
    """GPT-NeoX's LM head: lm_head in transformers 5, embed_out before."""
    import transformers

    return next(iter(transformers.GPTNeoXForCausalLM._tied_weights_keys))


def to_hf_state(model: GPT, kind: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names for `kind`."""
    ours, state = model.state_dict(), {}
    for entry in weight_names(kind, model.config):
        tensor = entry.to_theirs(ours[entry.ours])
        if len(entry.theirs) > 1:
            pieces = tensor.split(list(entry.sizes)) if entry.sizes else tensor.chunk(len(entry.theirs))
            state |= dict(zip(entry.theirs, pieces, strict=True))
        elif entry.theirs:
            state[entry.theirs[0]] = tensor
    return state


def from_hf_state(source: dict[str, torch.Tensor], kind: str, config: ModelConfig) -> dict[str, torch.Tensor | None]:
    """A transformers state dict of `kind` under our names (None: a tensor that is zero there); names a missing
    tensor."""

    def get(name: str) -> torch.Tensor:
        if name not in source:
            raise UserError(f"the transformers model has no tensor {name}; it does not match its config")
        return source[name]

    out = {}
    for entry in weight_names(kind, config):
        if not entry.theirs:  # e.g. GPT-Neo's q/k/v biases: zero
            out[entry.ours] = None
            continue
        tensor = torch.cat([get(name) for name in entry.theirs]) if len(entry.theirs) > 1 else get(entry.theirs[0])
        out[entry.ours] = entry.to_ours(tensor)
    return out


# -- export ------------------------------------------------------------------------------------------
def to_transformers(model: GPT):
    """The same network as a transformers model: GPT2LMHeadModel, GPTNeoForCausalLM, GPTNeoXForCausalLM or
    LlamaForCausalLM."""
    import transformers

    config = model.config
    kind = architecture(config)
    if kind == "gpt_neo":
        if config.attn_scale != 1.0:
            raise UserError(f"attention scale {config.attn_scale} exists in neither GPT-2 nor GPT-Neo; cannot export")
        if any(bool(block.attn.qkv.bias.detach().any()) for block in model.blocks):
            raise UserError("GPT-Neo has no q/k/v biases, and this model's are not zero; cannot export to GPT-Neo")
        hf = transformers.GPTNeoForCausalLM(_neo_config(config))
    elif kind == "llama":
        hf = transformers.LlamaForCausalLM._from_config(_llama_config(config), attn_implementation="sdpa")
    elif kind == "gpt_neox":
        hf = transformers.GPTNeoXForCausalLM._from_config(_neox_config(config), attn_implementation="sdpa")
    else:
        hf = transformers.GPT2LMHeadModel._from_config(_gpt2_config(config), attn_implementation="sdpa")
    return _load(hf, to_hf_state(model, kind), model)


def _gpt2_config(config: ModelConfig):
    import transformers

    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.attention_dropout,
        tie_word_embeddings=config.tied_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _neo_config(config: ModelConfig):
    import transformers

    layers = ["local" if i in config.local_layers else "global" for i in range(config.n_layer)]
    return transformers.GPTNeoConfig(
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
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tied_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _neox_config(config: ModelConfig):
    import transformers

    return transformers.GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        hidden_act="gelu_new",
        max_position_embeddings=config.context_length,
        layer_norm_eps=1e-5,
        rotary_emb_base=config.rope_theta,  # the names of transformers 4, which 5 still reads
        rotary_pct=1.0,
        use_parallel_residual=False,  # x + attn(ln_1(x)), then + mlp(ln_2(.)): GPT-2's order
        attention_bias=True,
        hidden_dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tied_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _llama_config(config: ModelConfig):
    import transformers

    return transformers.LlamaConfig(
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
        attention_dropout=config.attention_dropout,
        bos_token_id=None,
        eos_token_id=None,
    )


def _load(hf, state: dict[str, torch.Tensor], model: GPT):
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    tied = set(type(hf)._tied_weights_keys or ()) if model.config.tied_embeddings else set()  # a list, or (5) a dict
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"weight mapping out of date: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.wte.weight.device).eval()


# -- import ------------------------------------------------------------------------------------------
def from_transformers(hf) -> GPT:
    """Our model with the weights of a transformers GPT-2, GPT-Neo or GPT-NeoX causal LM."""
    config = _our_config(hf.config)
    model = GPT(config)
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in from_hf_state(hf.state_dict(), hf.config.model_type, config).items():
            if tensor is None:
                target[name].zero_()
                continue
            if target[name].shape != tensor.shape:
                raise UserError(
                    f"tensor {name} has shape {tuple(tensor.shape)} in the transformers model, but the "
                    f"config asks for {tuple(target[name].shape)}; the checkpoint does not match its config"
                )
            target[name].copy_(tensor)
    return model.eval()


def _our_config(hf_config) -> ModelConfig:
    """The ModelConfig that computes what a transformers GPT-2, GPT-Neo or GPT-NeoX config describes."""
    if hf_config.model_type == "gpt2":
        config = ModelConfig(vocab_size=hf_config.vocab_size, d_model=hf_config.n_embd, n_layer=hf_config.n_layer,
                             n_head=hf_config.n_head, context_length=hf_config.n_positions)  # fmt: skip
    elif hf_config.model_type == "gpt_neo":
        local = tuple(i for i, kind in enumerate(hf_config.attention_layers) if kind == "local")
        config = ModelConfig(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                             n_layer=hf_config.num_layers, n_head=hf_config.num_heads,
                             context_length=hf_config.max_position_embeddings, attn_scale=1.0,
                             local_window=hf_config.window_size if local else None, local_layers=local)  # fmt: skip
    elif hf_config.model_type == "gpt_neox":
        config = _our_neox_config(hf_config)
    else:
        raise UserError(f"unsupported architecture {hf_config.model_type!r}; supported: {', '.join(SUPPORTED)}")
    activation = getattr(hf_config, "activation_function", None) or getattr(hf_config, "hidden_act", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"unsupported activation {activation!r}; supported: gelu_new, gelu_pytorch_tanh, gelu")
    return ModelConfig.from_dict({**config.to_dict(), "activation": "gelu" if activation == "gelu" else "gelu_tanh"})


def _our_neox_config(hf_config) -> ModelConfig:
    """GPT-NeoX models that are a GPT-2 block with rotary positions; others (Pythia: parallel residuals, a
    quarter of each head rotated) are refused, naming what differs."""
    rope = getattr(hf_config, "rope_parameters", None) or {  # transformers 4's names
        "rope_theta": hf_config.rotary_emb_base, "partial_rotary_factor": hf_config.rotary_pct,
        "rope_type": (hf_config.rope_scaling or {}).get("rope_type", "default"),
    }  # fmt: skip
    differences = {
        "use_parallel_residual": (hf_config.use_parallel_residual, False),
        "partial_rotary_factor": (rope.get("partial_rotary_factor", 1.0), 1.0),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "attention_bias": (hf_config.attention_bias, True),
        "intermediate_size": (hf_config.intermediate_size, 4 * hf_config.hidden_size),
        "layer_norm_eps": (hf_config.layer_norm_eps, 1e-5),
    }
    if misses := [f"{name}={value!r} (needs {need!r})" for name, (value, need) in differences.items() if value != need]:
        raise UserError(f"this GPT-NeoX model is not a GPT-2 block with rotary positions: {', '.join(misses)}")
    return ModelConfig(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                       n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                       context_length=hf_config.max_position_embeddings, position="rope",
                       rope_theta=float(rope.get("rope_theta", 10_000.0)),
                       tied_embeddings=bool(hf_config.tie_word_embeddings))  # fmt: skip


def load_pretrained(name: str | os.PathLike) -> tuple[GPT, Tokenizer, dict]:
    """Our model and tokenizer from a transformers directory or hub id (GPT-2, GPT-Neo or GPT-NeoX)."""
    import transformers

    if not Path(name).exists() and not hub.offline() and not hub.hub_reachable():
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
            precision = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
            hf = transformers.AutoModelForCausalLM.from_pretrained(name, **precision, weights_only=True)
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
    transformers.utils.logging.disable_progress_bar()  # its bars on stderr would bury our one-line messages
    try:
        with atomic.staging_dir(out, sync=False) as tmp:  # an empty folder at `out` is replaced
            hf.save_pretrained(tmp, safe_serialization=True)
            hf_tokenizer.save_pretrained(tmp)
    except SafetensorError as error:  # how safetensors reports a failed write, e.g. a full disk
        raise write_error(error, out) from error
    return out
