"""The ``keras-llama`` command line's options: their constants, parser helpers and checks
(everything that runs before a model loads). The commands are in `keras_llama.cli`."""

import argparse
import contextlib
import math

DEFAULT_PRESET = "smollm2_135m_instruct"
DEFAULT_MAX_NEW_TOKENS = 256
SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")
# --dtype values: float weights as named, or float32 weights quantized to int8 after loading.
DTYPES = ("float32", "bfloat16", "float16", "int8")
# Options other tools have that no keras-llama sampler implements: refused with this reason.
UNSUPPORTED = {
    "--min-p": "min-p sampling is not implemented by any keras-llama sampler",
    "--repeat-penalty": "no keras-llama sampler applies a repetition penalty",
}
KERAS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


class UsageError(Exception):
    """A bad option (exit code 2)."""


# --- model loading and sampling options --------------------------------------------------------
def add_model_options(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="built-in name, kaggle://..., hf://..., a preset folder or a .gguf file "
        f"(default: {DEFAULT_PRESET})",
    )
    add_dtype_option(parser)
    parser.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help="default: picked from the options given: --num-beams -> beam, --top-p -> top_p, "
        "--top-k -> top_k, --temperature > 0 -> random, otherwise greedy",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (0: greedy)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="k of top_k/top_p/contrastive")
    parser.add_argument("--top-p", type=float, default=None, help="p of top_p")
    parser.add_argument("--num-beams", type=int, default=None, help="beams of the beam sampler")
    parser.add_argument("--seed", type=int, default=None, help="seed of a sampling sampler")
    parser.add_argument("--system", default=None, help="a system message for the chat template")
    for flag in UNSUPPORTED:  # refused with a reason, not "unrecognized arguments"
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)


def add_dtype_option(parser):
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"one of {', '.join(DTYPES)} (int8: float32 weights quantized after loading; "
        "default: the preset's)",
    )


def add_length_options(parser, total=False):
    """``--max-new-tokens``; with ``total``, also ``--max-length`` (``generate(max_length=)``'s
    name: prompt plus completion), the two mutually exclusive."""
    group = parser.add_mutually_exclusive_group() if total else parser
    group.add_argument(
        "-n",
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


def sampler_name(args):
    """The sampler: ``--sampler`` if given, else picked from the options given (as llama-cli
    and transformers pick sampling from them)."""
    if args.sampler is not None:
        return args.sampler
    if args.num_beams is not None:
        return "beam"
    if args.top_p is not None:
        return "top_p"
    if args.top_k is not None:
        return "top_k"
    if args.temperature:
        return "random"
    return "greedy"


def make_sampler(args):
    """The sampler for ``args``; a `UsageError` for options it would ignore or bad values."""
    from keras_llama import samplers

    name = sampler_name(args)
    applies = {
        "--top-k": (args.top_k, ("top_k", "top_p", "contrastive")),
        "--top-p": (args.top_p, ("top_p",)),
        "--num-beams": (args.num_beams, ("beam",)),
        "--seed": (args.seed, ("top_k", "top_p", "random")),
        "--temperature": (
            args.temperature or None,
            ("top_k", "top_p", "random", "beam", "contrastive"),
        ),
    }
    for flag, (value, samplers_using_it) in applies.items():
        if value is not None and name not in samplers_using_it:
            raise UsageError(
                f"{flag} has no effect with the {name} sampler; it applies to "
                f"{', '.join(samplers_using_it)}. Received: {flag} {value} (sampler: {name})"
            )
    kwargs = {}
    if args.temperature is not None:
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise UsageError(
                f"--temperature must be a finite number >= 0. Received: {args.temperature}"
            )
        if args.temperature > 0:
            kwargs["temperature"] = args.temperature
    for key, value in (("seed", args.seed), ("k", args.top_k), ("p", args.top_p),
                       ("num_beams", args.num_beams)):  # fmt: skip
        if value is not None:
            kwargs[key] = value
    try:
        return type(samplers.get(name))(**kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None


@contextlib.contextmanager
def as_usage_errors():
    """Input checks that run before the model loads (an existing output, a bad data line)
    end as usage errors (exit 2), like a bad option."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def check_options(args):
    """Every check that needs no model, so a bad option fails before the model loads."""
    for flag, reason in UNSUPPORTED.items():
        if getattr(args, flag[2:].replace("-", "_"), None) is not None:
            raise UsageError(f"{flag} is not supported: {reason}.")
    # (convert's --dtype depends on its target: `cmd_convert` checks it, before loading.)
    if args.command != "convert" and getattr(args, "dtype", None) not in (None, *DTYPES):
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}. Received: {args.dtype}")
    max_new_tokens = getattr(args, "max_new_tokens", None)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer. Received: {max_new_tokens}")
    max_length = getattr(args, "max_length", None)
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be an integer >= 2. Received: {max_length}")
    if hasattr(args, "sampler"):
        args.sampler_object = make_sampler(args)


def read_prompt(args, inp):
    """The prompt: the argument, ``-p``, ``-`` (standard input) or ``--file``; exactly one."""
    given = [x for x in (args.prompt, args.prompt_option, args.file) if x is not None]
    if len(given) != 1:
        raise UsageError(
            "generate needs exactly one prompt: an argument, -p TEXT, - (standard input) or "
            f"--file PATH. Received: {len(given)}"
        )
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the prompt file {args.file!r}: {e}") from None
    prompt = given[0]
    return inp.read() if prompt == "-" else prompt


def dtype_kwargs(args):
    if args.dtype is None:
        return {}
    return {"dtype": "float32" if args.dtype == "int8" else args.dtype}


def add_convert_options(conv):
    """``keras-llama convert``'s arguments."""
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


def add_finetune_options(tune):
    """``keras-llama finetune``'s options."""
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
    tune.add_argument("--seed", type=int, default=0,
                      help="random seed of the adapters' initial values and the example order "
                      "(default: 0, so that a run can be repeated)")  # fmt: skip


def add_serve_options(serve):
    """``keras-llama serve``'s options."""
    serve.add_argument(
        "--preset", default=DEFAULT_PRESET, help=f"as for generate (default: {DEFAULT_PRESET})"
    )
    add_dtype_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--model-name", default=None, help="the model id clients pass (default: the preset's name)"
    )
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    serve.add_argument("--max-batch-size", type=int, default=8, help="slots decoded together")
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the slots (then 429)"
    )
    serve.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="most tokens per request (prompt + completion)",
    )
    serve.add_argument(
        "--steps-per-run",
        type=int,
        default=8,
        help="decode steps per compiled call while no request waits (default: 8; streamed "
        "tokens come in groups of this many); 1 for one step per call",
    )
    serve.add_argument("--log-level", default="info")
