"""The `gpt-tinystories` command: one small function per verb over the Python API.

A `UserError` becomes one line on stderr and exit code 2 (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Iterable, Sequence

from .errors import UserError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its real default (unless the help already names it); epilogs keep their
    layout, so a verb can end its help with a table."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _has_default(action):  # argparse prints no help line at all for help=None
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if _has_default(action) and "default" not in text:
            text = f"{text} (default: %(default)s)".strip()
        return text


def _has_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default not in (None, False, "", argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_presets(args: argparse.Namespace) -> None:
    from .config import PRESETS, ModelConfig

    vocabs = args.vocab_size or [4096, 50257]
    header = f"{'preset':<9} {'d_model':>7} {'layers':>6} {'heads':>5}" + "".join(
        f" {f'total@{v}':>14} {'non-emb':>10}" for v in vocabs
    )
    print(header)
    for name in PRESETS:
        cells = ""
        for vocab in vocabs:
            config = ModelConfig.from_preset(name, vocab, context_length=args.context_length)
            cells += f" {config.num_parameters():>14,} {config.num_parameters(non_embedding=True):>10,}"
        print(f"{name:<9} {config.d_model:>7} {config.n_layer:>6} {config.n_head:>5}{cells}")
    print(f"(context length {args.context_length}; the LM head is tied to the token embedding)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    started = time.perf_counter()
    prepared = prepare(args.data, tokenizer, split=args.split, out=args.out, cache_dir=args.cache_dir)
    meta, seconds = prepared.meta, time.perf_counter() - started
    how = "cached" if prepared.from_cache else f"{meta['text_bytes'] / seconds / 1e6:.1f} MB/s of text"
    print(
        f"{meta['stories']:,} stories, {meta['tokens']:,} tokens ({meta['dtype']}, tokenizer {tokenizer.name}) "
        f"in {prepared.path}  [{seconds:.1f} s, {how}]"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from . import load
    from .engine import Sampling
    from .generate import check_seed
    from .tokenizer import EOS

    if args.beams and (args.temperature or args.top_k or args.top_p):  # 0 (greedy) is as deterministic as beams
        raise UserError("beam search (--beams) samples nothing: leave out --temperature, --top-k and --top-p")
    temperature = 0.8 if args.temperature is None else args.temperature
    if (args.beams or temperature == 0) and args.num_samples > 1:
        how = f"beam search (--beams {args.beams})" if args.beams else "greedy decoding (--temperature 0)"
        raise UserError(f"{how} writes the same story every time: pass --num-samples 1, or sample at a temperature")
    Sampling(temperature, args.top_k, args.top_p)  # its checks, before the model loads
    check_seed(args.seed)
    teller = load(args.checkpoint, args.device, args.dtype)
    teller.compile = args.compile
    context = teller.model.config.context_length
    prompt_tokens = len(teller.encode_prompt(args.prompt))
    if prompt_tokens > context and not args.truncate_prompt:
        raise UserError(f"the prompt has {prompt_tokens} tokens, more than the model's context of {context}; "
                        "shorten it, or pass --truncate-prompt to keep its last tokens")  # fmt: skip
    if prompt_tokens > context:
        print(f"note: the prompt has {prompt_tokens} tokens; keeping its last {context} (the model's context)",
              file=sys.stderr)  # fmt: skip
    options = {"max_new_tokens": args.max_new_tokens, "temperature": temperature, "top_k": args.top_k,
               "top_p": args.top_p, "keep_eos": True}  # fmt: skip
    for index in range(args.num_samples):
        seed = None if args.seed is None else args.seed + index
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        print(args.prompt, end="", flush=True)
        if args.beams:
            pieces: Iterable[str] = [teller.beam_search(args.prompt, args.max_new_tokens, args.beams, keep_eos=True)]
        elif args.stream:
            pieces = teller.stream(args.prompt, seed=seed, **options)
        else:
            pieces = [teller.generate(args.prompt, seed=seed, **options)]
        ended = False
        for piece in pieces:
            ended = piece.endswith(EOS)
            print(piece.removesuffix(EOS), end="", flush=True)
        print()
        if not ended:  # on stderr: stdout stays the story alone
            print(f"note: cut at the {args.max_new_tokens}-token limit before the story ended; --max-new-tokens "
                  "raises it", file=sys.stderr)  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .checkpoint import load_model
    from .evaluate import Evaluator
    from .quantize import apply_dtype
    from .runtime import pick_device

    device = pick_device(args.device)
    model, tokenizer, meta = load_model(args.checkpoint, device)
    model = apply_dtype(model, args.dtype)
    context = args.context_length or model.config.context_length
    if context > model.config.context_length:
        raise UserError(f"--context-length {context} exceeds the model's {model.config.context_length}")
    options = {"batch_size": args.batch_size, "max_batches": args.max_batches, "device": device, "stride": args.stride}
    evaluator = Evaluator.from_data(args.data, tokenizer, context, args.split, progress=not args.json, **options)
    result = evaluator.evaluate(model, progress=not args.json)
    report = {"checkpoint": meta["path"], "step": meta.get("step"), "data": str(args.data), "split": args.split,
              "tokenizer": tokenizer.name, "context_length": context, "stride": args.stride or context,
              **result.to_dict()}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return
    windows = f"windows of {context}" + (f", scored {args.stride} targets at a time" if args.stride else "")
    print(f"{meta['path']} (step {meta.get('step')}) on {args.data}: {result.tokens:,} tokens, "
          f"{result.text_bytes:,} bytes, {result.gpt2_tokens:,} GPT-2 tokens ({windows})")  # fmt: skip
    print(f"  loss                  {result.loss:.4f} nats/token")
    print(f"  perplexity            {result.perplexity:.2f}")
    print(f"  bits per byte         {result.bits_per_byte:.4f}")
    print(f"  nats per GPT-2 token  {result.nats_per_gpt2_token:.4f}   (original gpt-tinystories: 8M 1.56, 28M 1.32)")


def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .exports import export

    model, tokenizer, meta = load_model(args.checkpoint)
    out = export(model, tokenizer, args.out, args.format, args.outtype)
    if args.format == "hf":
        from .hf import architecture

        names = {"gpt2": "GPT-2", "gpt_neo": "GPT-Neo", "gpt_neox": "GPT-NeoX", "llama": "Llama"}
        kind = names[architecture(model.config)]
        print(f"exported {meta['path']} as a transformers {kind} model to {out}")
    else:
        what = {"gguf": f"a GGUF file ({args.outtype or 'f32'}) for llama.cpp", "onnx": "an ONNX model with a KV cache"}
        print(f"exported {meta['path']} as {what[args.format]} to {out}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare

    report = compare(args.run_dirs, args.out, args.data, args.split, args.batch_size, args.max_batches, args.stride)
    print(f"compared {len(args.run_dirs)} runs -> {report} (plots beside it)")


def cmd_judge(args: argparse.Namespace) -> None:
    from .grading import Judge
    from .judge import JudgeConfig, default_out, run
    from .judge_report import HEADLINE, METRICS, cell

    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise UserError(
                "LLM grading needs both --judge-url and --judge-model (e.g. https://api.openai.com/v1 gpt-4o)"
            )
        judge = Judge(args.judge_url, args.judge_model, args.judge_api_key_env, args.judge_concurrency,
                      args.judge_retries, args.judge_timeout, args.judge_cache)  # fmt: skip
    config = JudgeConfig(args.checkpoint, args.out, args.prompts, args.samples, args.max_new_tokens, args.temperature,
                         args.top_k, args.top_p, args.beams, args.seed, args.batch_size, args.train_data,
                         args.train_split, args.index_dir, args.reference, judge, args.device)  # fmt: skip
    report = run(config)
    out = args.out or default_out(args.checkpoint)
    for key in HEADLINE:
        if key in report["metrics"]:
            print(f"  {METRICS[key][0]:<28} {cell(report['metrics'][key])}")
    if grading := report["grading"]:
        errors = sum(grading["errors"].values())
        print(
            f"  graded {grading['graded']}/{grading['requested']} ({grading['from_cache']} cached, {errors} not graded)"
        )
    print(
        f"{report['generation']['tokens']:,} tokens in {report['generation']['seconds']:.1f} s; "
        f"reports in {out}: report.md, report.html, report.json, completions.jsonl"
    )


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def cmd_serve(args: argparse.Namespace) -> None:
    import ipaddress

    from . import load, serve

    limits = serve.Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens,
                          max_samples=args.max_samples, max_queue=args.max_queue, max_batch=args.max_batch)  # fmt: skip
    api_key = args.api_key or os.environ.get(serve.API_KEY_ENV) or None
    sock = serve.bind(args.host, args.port)  # before loading the model: a taken port fails at once
    teller = load(args.checkpoint, args.device, args.dtype)
    app = serve.create_app(teller, limits, api_key)
    _decide_compile(app.state.worker.engine, args.compile)
    try:
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use the "
              f"model (set --api-key or ${serve.API_KEY_ENV})", file=sys.stderr)  # fmt: skip
    ready = f"story playground for {app.state.worker.teller.source} at {serve.url(sock)} (Ctrl-C stops)"
    serve.run(app, sock, args.log_level, on_ready=lambda: print(ready, flush=True))


def _decide_compile(engine, choice: str) -> None:
    """Compile the server's decode step if asked (before serving), or, with auto, on a GPU where a measurement
    before serving shows it pays. On a CPU auto stays eager: compiling takes from 20 s to minutes there, and a
    compile running beside the server took its cores and, in tests, its clean exit on Ctrl-C."""
    from .engine import measure_compile

    def decide() -> None:
        try:
            print(measure_compile(engine, force=choice == "on"), file=sys.stderr, flush=True)
        except Exception as error:  # no C++ compiler, an unsupported op...: eager decoding still works
            if choice == "on":
                message = f"--compile on: compiling the decode step failed ({error}); use --compile off"
                raise UserError(message) from None
            print(f"compiled decode step: failed ({type(error).__name__}); staying eager", file=sys.stderr)

    if choice == "on" or (choice == "auto" and engine.device.type == "cuda"):
        decide()


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .data import iter_stories
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter_stories(args.data, args.split), args.vocab_size, show_progress=True)
    path = tokenizer.save(args.out)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE (hash {tokenizer.hash}) -> {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config_file
    from .trainer import train

    values = load_config_file(args.config) if args.config else {}
    values.update({name: getattr(args, name) for name in _config_names() if hasattr(args, name)})
    config = TrainConfig.from_dict(values, source=args.config or "train config")
    out = args.out or f"runs/{config.preset}"
    result = train(config, out, resume=args.resume)
    if result.stopped_by_signal:
        return 128 + result.stopped_by_signal
    if result.rank != 0:
        return 0
    print(f"done: step {result.step}, {result.tokens:,} tokens, val loss {result.val_loss:.4f}, "
          f"{result.val_bpb:.4f} bits/byte -> {result.run_dir}\n")  # fmt: skip
    print(_story_report(result.sample, config.sample_tokens))
    return 0


def _story_report(sample: str, limit: int) -> str:
    """The run's sample story, saying whether it ended by itself (with EOS) or was cut at `limit` tokens."""
    from .tokenizer import EOS

    if sample.endswith(EOS):
        return f"A story it wrote (it ended by itself):\n{sample.removesuffix(EOS)}"
    return (f"A story it wrote (cut at the {limit}-token limit before it ended; --sample-tokens sets the limit):\n"
            f"{sample} [...]")  # fmt: skip


def _config_names() -> list[str]:
    from dataclasses import fields

    from .config import TrainConfig

    return [f.name for f in fields(TrainConfig)]


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--max-steps for max_steps ...); given flags override the config file."""
    import typing
    from dataclasses import fields

    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config values (override --config)")
    for field in fields(TrainConfig):
        kinds = [t for t in (typing.get_args(hints[field.name]) or [hints[field.name]]) if t is not type(None)]
        kind = kinds[0]
        flag = "--" + field.name.replace("_", "-")
        text = _config_help(field.name, field.default).replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)  # fmt: skip
            continue
        group.add_argument(flag, dest=field.name, type=_typed(kind, str in kinds), default=argparse.SUPPRESS,
                           metavar=kind.__name__.upper(), help=text)  # fmt: skip


def _config_help(name: str, default: object) -> str:
    """'one of ...; default: ...' for a TrainConfig field: its allowed values, and what it is when not given."""
    from .config import CHOICES, NARROW_BELOW_PASSES, OPTIMIZERS, PRECISIONS, PRESETS, SCHEDULES, ModelConfig

    allowed = {"preset": tuple(PRESETS), "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS,
               **CHOICES, "tokenizer": ("gpt2", "bpe-N (trained on the data)", "a tokenizer.json path"),
               "device": ("auto", "cpu", "cuda", "cuda:N", "mps"),
               "dropout": ("a number in [0, 1)", "auto (0.1 for a run of many passes over its data)")}  # fmt: skip
    when_unset = {
        "val_data": "the hub's validation split, or the last val_fraction of local data",
        "init_from": "random weights; else a run dir, checkpoint folder or transformers model",
        "context_length": f"{ModelConfig.context_length}",
        "n_kv_head": "n_head (multi-head attention)",
        "narrow_d_model": f"never; N: train N wide where a time-limited run plans < {NARROW_BELOW_PASSES} passes over "
        "its data",
        "attention_dropout": "dropout's (on a CPU, 0 keeps the fused attention kernel)",
        "max_time": "none; e.g. 90s, 15m, 2h",
        "checkpoint_every": "at every evaluation",
        "threads": "torch's default (every core)",
        **dict.fromkeys(("d_model", "n_layer", "n_head", "lr", "tokens_per_step", "warmup_steps"), "the preset's"),
        **dict.fromkeys(("max_steps", "max_tokens", "max_epochs"), "none (with no budget at all: 1 epoch)"),
    }
    if default is None:
        model_default = getattr(ModelConfig, name, None)
        shown = when_unset.get(name, str(model_default))
    else:
        shown = str(default)
    choices = f"one of {', '.join(allowed[name])}; " if name in allowed else ""
    return f"{choices}default: {shown}"


def _preset_table() -> str:
    """The per-preset defaults, as the epilog of `train --help`."""
    from .config import PRESETS, TRAIN_PRESETS

    lines = ["defaults per preset (each can be overridden by its flag):",
             f"  {'preset':<9} {'d_model':>7} {'n_layer':>7} {'n_head':>6} {'lr':>7} {'tokens_per_step':>15} "
             f"{'warmup_steps':>12}"]  # fmt: skip
    for name, shape in PRESETS.items():
        train = TRAIN_PRESETS[name]
        lines.append(f"  {name:<9} {shape['d_model']:>7} {shape['n_layer']:>7} {shape['n_head']:>6} {train['lr']:>7g} "
                     f"{train['tokens_per_step']:>15,} {train['warmup_steps']:>12}")  # fmt: skip
    return "\n".join(lines)


def _typed(kind: type, or_word: bool = False):
    """A parser for a flag of `kind`; with `or_word`, text that is not a number passes as a string, for the
    config to check (dropout: a number or auto)."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            if or_word:
                return text
            kind_name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind_name}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt-tinystories", description="Train, evaluate and sample small GPTs on TinyStories.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")
    _add_data_verbs(verbs)
    _add_training_verbs(verbs)
    _add_model_verbs(verbs)
    return parser


def _add_data_verbs(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("presets", help="list the model presets and their parameter counts")
    p.add_argument("--vocab-size", type=_positive_int, action="append", help="vocabulary size(s) to count with")
    p.add_argument("--context-length", type=_positive_int, default=512)
    p.set_defaults(func=cmd_presets)

    p = verbs.add_parser("prepare", help="tokenize stories into uint16 token shards (cached)")
    p.add_argument("--data", required=True, help="hub dataset id, or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer.json / its folder (default: gpt2)")
    p.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--out", help="output folder (default: a cache folder keyed by data and tokenizer)")
    p.add_argument("--cache-dir", help="cache root (default: $GPT_TINYSTORIES_CACHE or ~/.cache/gpt-tinystories)")
    p.set_defaults(func=cmd_prepare)

    tok = verbs.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tokenizer_verb", required=True, parser_class=_Parser, metavar="VERB"
    )
    p = tok.add_parser("train", help="train a byte-level BPE on stories")
    p.add_argument("--data", required=True, help="hub dataset id, or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--vocab-size", type=_positive_int, default=4096)
    p.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    p.set_defaults(func=cmd_tokenizer_train)


def _add_training_verbs(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train", help="train a model (resumes when the run dir holds a checkpoint of it)",
                         epilog=_preset_table())  # fmt: skip
    p.add_argument("--config", help="a TOML or JSON file of config values")
    p.add_argument("--out", help="run dir (default: runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("compare", help="a markdown report and loss plots comparing training runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the run dirs to compare (two or more)")
    p.add_argument("--out", default="comparison", help="folder for report.md and the plots (default: comparison)")
    p.add_argument("--data", help="also score each run's best checkpoint on this data (hub id, file or folder)")
    p.add_argument("--split", default="validation", help="split of a hub dataset for --data")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="for --data")
    p.add_argument("--max-batches", type=_positive_int,
                   help="score only this many batches of --data (windows spread evenly over it)")  # fmt: skip
    p.add_argument("--stride", type=_positive_int,
                   help="score --data in sliding windows, this many targets at a time (as eval --stride)")  # fmt: skip
    p.set_defaults(func=cmd_compare)


def _add_model_verbs(verbs: argparse._SubParsersAction) -> None:
    _add_generate_verb(verbs)
    p = verbs.add_parser("eval", help="validation loss, perplexity, bits per byte of a trained model")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run dir, a checkpoint folder, or a transformers GPT-2/GPT-Neo/GPT-NeoX folder or hub id",
    )
    p.add_argument("--data", required=True, help="hub dataset id, or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--split", default="validation", help="split of a hub dataset (default: validation)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-batches", type=_positive_int,
                   help="evaluate only this many batches (windows spread evenly over the data)")  # fmt: skip
    p.add_argument("--context-length", type=_positive_int, help="window length (default: the model's context)")
    p.add_argument("--stride", type=_positive_int,
                   help="sliding-window evaluation: score each window this many targets at a time, each read after "
                   "the context-length tokens before it (a divisor of the context length; default: the context "
                   "length, non-overlapping windows; takes context/stride times longer)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--device", default="auto")
    _add_dtype_flag(p)
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("export", help="write a checkpoint for transformers, llama.cpp (GGUF) or onnxruntime")
    p.add_argument("--checkpoint", required=True, help="a run dir or a checkpoint folder")
    p.add_argument("--format", choices=["hf", "gguf", "onnx"], default="hf",
                   help="hf: transformers GPT-2, GPT-Neo, GPT-NeoX or Llama folder; gguf: one llama.cpp file; "
                   "onnx: a folder with model.onnx (KV cache inputs/outputs), its tokenizer and "
                   "onnxruntime-genai's config")  # fmt: skip
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], help="gguf weights (default: f32)")
    p.add_argument("--out", required=True, help="the file (gguf) or folder to write (must not exist or be empty)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("judge", help="complete story beginnings and judge the stories (metrics, reference, LLM)")
    _add_judge_flags(p)
    p.set_defaults(func=cmd_judge)

    _add_serve_verb(verbs)


def _add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="bf16: faster for d >= 256 on CPUs; fp16: fp16 weights, faster decoding of one story at a "
                   "time (CPU only); int8: int8 Linear layers (CPU only)")  # fmt: skip


def _add_generate_verb(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("generate", help="write stories with a trained model")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run dir, a checkpoint folder, or a transformers GPT-2/GPT-Neo/GPT-NeoX folder or hub id",
    )
    p.add_argument("--prompt", default="", help="the start of the story (empty: a new story)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=1000, help="a cap: stories stop at their end")
    p.add_argument("--temperature", type=float, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--beams", type=_positive_int, help="beam search with this many beams (the paper used 5)")
    p.add_argument("--truncate-prompt", action="store_true", help="keep the last tokens of an over-long prompt")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print as it is written")
    p.add_argument("--device", default="auto")
    _add_dtype_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (pays only for long decoding: it takes 10 s to minutes)")  # fmt: skip
    p.set_defaults(func=cmd_generate)


def _add_serve_verb(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("serve", help="the story playground: an HTTP API and a page to write stories in a browser")
    p.add_argument("--checkpoint", required=True, help="a run dir, a checkpoint folder, or a transformers folder")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every network (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port (default: 8000)")
    p.add_argument("--max-prompt-chars", type=_positive_int, default=4000, help="longest prompt accepted")
    p.add_argument("--max-new-tokens", type=_positive_int, default=1000, help="cap on a request's max_new_tokens")
    p.add_argument("--max-samples", type=_positive_int, default=4, help="cap on a request's n")
    p.add_argument("--max-queue", type=_positive_int, default=16, help="requests that may wait; more get 503")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="KV-cache slots: sequences decoded together (memory grows with it; see README)")  # fmt: skip
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $GPT_TINYSTORIES_API_KEY)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode step; auto: on a GPU, where a start-up test shows it pays")  # fmt: skip
    p.add_argument("--device", default="auto")
    _add_dtype_flag(p)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    p.set_defaults(func=cmd_serve)


def _add_judge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run dir, a checkpoint folder, or a transformers model")
    p.add_argument("--prompts", help="YAML/JSON list of strings or one prompt per line (default: the paper's 44)")
    p.add_argument("--samples", type=int, default=10, help="completions per prompt (default: 10)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=300)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0, the model's own)")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--beams", type=_positive_int, help="beam search with this many beams (one story per prompt)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=110, help="completions decoded together")
    p.add_argument("--out", help="folder for the reports (default: RUN_DIR/judge)")
    p.add_argument("--train-data", help="training stories to measure copying against (indexed once, cached)")
    p.add_argument("--train-split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--index-dir", help="where the n-gram index lives (default: a cache folder keyed by the data)")
    p.add_argument("--reference", help="a model to score the continuations with (run dir or transformers model)")
    p.add_argument("--judge-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", help="the grading model's name at that endpoint")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the API key")
    p.add_argument("--judge-concurrency", type=_positive_int, default=4, help="requests in flight (default: 4)")
    p.add_argument("--judge-retries", type=int, default=4, help="retries on 429, 5xx and dropped connections")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    p.add_argument("--judge-cache", help="grade cache (default: judge-grades.sqlite in the cache folder)")
    p.add_argument("--device", default="auto")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"gpt-tinystories: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, no permission, a path through a file: the machine's, not ours
        if args.debug:
            raise
        print(f"gpt-tinystories: error: {_describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt-tinystories: interrupted", file=sys.stderr)
        return 130
    return code or 0


def _describe_os_error(error: OSError) -> str:
    import errno

    from .atomic import target_of

    where = f"{target_of(error.filename)}: " if error.filename else ""  # the file meant, not its temporary name
    what = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "free some disk space (or raise the file size limit) or write elsewhere, then run the command again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a location you can write to, or fix its permissions"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where a folder is needed: choose another path"
    else:
        fix = "check that the location exists, is writable and has free space"
    return f"{where}{what}; {fix}"
