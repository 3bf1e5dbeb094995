"""MkDocs hooks: pages hold markers that are replaced, at build time, by content generated from
the code and the benchmark log, so that none of it is copied by hand:

- ``<!-- gen:weights FORMAT -->``: the weight-name table of a checkpoint format (``huggingface``,
  ``gguf``, ``meta``), rendered from the converter tables in ``keras_llama/presets/``;
- ``<!-- gen:keras-h5-layout -->``: the datasets of a tiny backbone's ``model.weights.h5``;
- ``<!-- gen:cli -->``: the help of ``keras-llama`` and each of its commands, from the parser;
- ``<!-- gen:request-fields CLASS -->``: the fields of a request body of the server (a pydantic
  model in ``keras_llama/serving/schemas.py``) with their types, defaults and bounds;
- ``<!-- gen:results HEADING -->``: a section of ``benchmarks/RESULTS.md`` (the heading line as
  written there), its headings demoted to fit under the page's.
"""

import contextlib
import os
import re
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
# A marker stands alone on its line (one quoted in the text, e.g. in backticks, is left alone).
MARKER = re.compile(r"^<!-- gen:(?P<kind>[\w-]+)(?: (?P<arg>.*?))? -->$", re.M)

# A symbolic config whose dimensions are all distinct, so that each number in a shape names one
# dimension (hidden = query heads x head_dim, as in every Llama).
_DIMS = {"V": 101, "m": 60, "u": 6, "v": 3, "h": 10, "f": 100}
_SYMBOLIC_CONFIG = {
    "vocabulary_size": _DIMS["V"],
    "hidden_dim": _DIMS["m"],
    "num_query_heads": _DIMS["u"],
    "num_key_value_heads": _DIMS["v"],
    "intermediate_dim": _DIMS["f"],
    "num_layers": 1,
    "tie_word_embeddings": False,
}


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: _generate(m["kind"], m["arg"], page.file.src_path), markdown)


def _generate(kind, arg, where):
    if kind == "weights":
        return weight_table(arg)
    if kind == "keras-h5-layout":
        return keras_h5_layout()
    if kind == "cli":
        return cli_reference()
    if kind == "results":
        return results_section(arg)
    if kind == "request-fields":
        return request_fields(arg)
    raise ValueError(f"{where}: unknown generated-content marker. Received: gen:{kind}")


def _shape(shape):
    names = {size: name for name, size in _DIMS.items()}
    names[_DIMS["u"] * _DIMS["h"]] = "m"  # u*h == m
    names[_DIMS["v"] * _DIMS["h"]] = "v*h"
    return "[" + ", ".join(names[s] for s in shape) + "]"


def _huggingface_rows():
    """``{hf_name: (our_path, hf_shape, our_shape)}``, layer 0 written as ``{i}``."""
    import numpy as np

    from keras_llama.presets import huggingface

    rows = {}
    for hf_name, ours, hook, shape in huggingface.weight_table(_SYMBOLIC_CONFIG):
        our_shape = np.asarray(hook(np.zeros(shape, "float32"), _SYMBOLIC_CONFIG)).shape
        hf_name = hf_name.replace("model.layers.0.", "model.layers.{i}.")
        ours = ours.replace("transformer_layer_0/", "transformer_layer_{i}/")
        rows[hf_name] = (ours, _shape(shape), _shape(our_shape))
    return rows


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def weight_table(fmt):
    hf = _huggingface_rows()
    legend = (
        "\n\nShapes: `V` vocabulary, `m` hidden, `f` intermediate, `u` query heads, `v` key/value "
        "heads, `h` head_dim. `{i}` is the layer index. The `lm_head` / `output` row is absent "
        "when the embeddings are tied.\n"
    )
    if fmt == "huggingface":
        rows = [(f"`{n}`", s, f"`{o}`", os_) for n, (o, s, os_) in hf.items()]
        header = ("Hugging Face tensor", "shape", "keras-llama variable", "shape")
        return _table(header, rows) + legend
    if fmt == "gguf":
        from keras_llama.presets import gguf_format

        names = dict(gguf_format.GLOBAL_NAMES)
        names.update({f"blk.{{i}}.{g}": f"model.layers.{{i}}.{n}"
                      for g, n in gguf_format.LAYER_NAMES.items()})  # fmt: skip
        rows = [(f"`{g}`", f"`{n}`", f"`{hf[n][0]}`", hf[n][2]) for g, n in names.items()]
        header = ("GGUF tensor", "Hugging Face name", "keras-llama variable", "shape")
        ignored = ", ".join(f"`{t}`" for t in gguf_format.IGNORED_TENSORS)
        return _table(header, rows) + legend + f"\nRead into the config, not weights: {ignored}.\n"
    if fmt == "meta":
        from keras_llama.presets import meta_format

        names = dict(meta_format.GLOBAL_NAMES)
        names.update({f"layers.{{i}}.{m}": (f"model.layers.{{i}}.{n}", d)
                      for m, (n, d) in meta_format.LAYER_NAMES.items()})  # fmt: skip
        rows = [
            (f"`{m}`", f"`{n}`", f"`{hf[n][0]}`", hf[n][2], "replicated" if d is None else str(d))
            for m, (n, d) in names.items()
        ]
        header = ("Meta tensor", "Hugging Face name", "keras-llama variable", "shape",
                  "shards joined along")  # fmt: skip
        return _table(header, rows) + legend
    raise ValueError(f"Unknown checkpoint format for gen:weights. Received: {fmt!r}")


def keras_h5_layout():
    """The datasets of a tiny untied backbone's weight file, as KerasHub writes them."""
    import h5py

    from keras_llama.models import LlamaBackbone

    backbone = LlamaBackbone(
        vocabulary_size=_DIMS["V"], num_layers=2, num_query_heads=_DIMS["u"],
        hidden_dim=_DIMS["m"], intermediate_dim=_DIMS["f"],
        num_key_value_heads=_DIMS["v"],
    )  # fmt: skip
    paths = {v.path: v.shape for v in backbone.weights}
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        with warnings.catch_warnings():  # Keras's saving calls np.array(jax_array, copy=False)
            warnings.simplefilter("ignore", DeprecationWarning)
            backbone.save_weights(path)
        with h5py.File(path) as f:
            f.visititems(
                lambda n, o: found.append((n, o.shape)) if isinstance(o, h5py.Dataset) else None
            )
    h5_rows = [(f"`{n}`", _shape(s)) for n, s in found]
    var_rows = [(f"`{p}`", _shape(s)) for p, s in paths.items()]
    return (
        "Datasets of `model.weights.h5` (a two-layer backbone, embeddings untied):\n\n"
        + _table(("dataset", "shape"), h5_rows)
        + "\nThe same weights as Keras variables (`backbone.weights`, their `.path`):\n\n"
        + _table(("variable", "shape"), var_rows)
    )


def cli_reference():
    from keras_llama.cli import build_parser

    parser = build_parser()
    with _columns(84):  # fits the page's code box
        sections = ["## keras-llama\n", "```text\n" + parser.format_help() + "```\n"]
        for name, command in _subcommands(parser).items():
            sections += [f"## keras-llama {name}\n", "```text\n" + command.format_help() + "```\n"]
    return "\n".join(sections)


def _subcommands(parser):
    # argparse has no public accessor for subparsers: the action holding them is found by type.
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@contextlib.contextmanager
def _columns(width):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def results_section(heading, demote_to=3):
    """The section of RESULTS.md under ``heading`` (a line as written, e.g. ``### int8 ...``),
    up to the next heading of the same or a higher level, its top heading dropped and the rest
    shifted so that the section's sub-headings start at level ``demote_to``."""
    with open(RESULTS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    heading = heading.strip()
    try:
        start = lines.index(heading)
    except ValueError:
        raise ValueError(f"benchmarks/RESULTS.md has no heading {heading!r}") from None
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1 :]:
        m = re.match(r"^(#+) ", line)
        if m and len(m[1]) <= level:
            break
        if m:
            line = "#" * (len(m[1]) - level - 1 + demote_to) + line[len(m[1]) :]
        body.append(line)
    return "\n".join(body).strip() + "\n"


def request_fields(class_name):
    """A table of a request model's fields: name, type, default, bounds."""
    import typing

    from keras_llama.serving import schemas

    model = getattr(schemas, class_name)
    rows = []
    for name, field in model.model_fields.items():
        annotation = typing.get_type_hints(model)[name]
        kind = re.sub(r"\btyping\.|\bkeras_llama\.serving\.schemas\.", "", str(annotation))
        kind = kind.replace("<class '", "").replace("'>", "")
        default = "required" if field.is_required() else f"`{field.default!r}`"
        bounds = ", ".join(
            f"{op} {getattr(m, key)}"
            for m in field.metadata
            for key, op in (
                ("ge", ">="),
                ("gt", ">"),
                ("le", "<="),
                ("lt", "<"),
                ("min_length", "length >="),
            )  # fmt: skip
            if getattr(m, key, None) is not None
        )
        rows.append((f"`{name}`", f"`{kind}`", default, bounds))
    return _table(("field", "type", "default", "bounds"), rows)
