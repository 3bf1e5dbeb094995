"""The public API the reference must cover: every name exported by ``keras_llama.models``,
``samplers``, ``tokenizers`` and ``serving``, the export entry points (the classes'
``export_to_*`` methods and the writers they call) and the command line's entry points."""

NAMESPACES = ("keras_llama.models", "keras_llama.samplers", "keras_llama.tokenizers",
              "keras_llama.serving")  # fmt: skip

EXPORT_ENTRY_POINTS = (
    "keras_llama.models.CausalLM.export_to_transformers",
    "keras_llama.models.CausalLM.export_to_gguf",
    "keras_llama.models.Backbone.export_to_transformers",
    "keras_llama.models.CausalLMPreprocessor.export_to_transformers",
    "keras_llama.tokenizers.Tokenizer.export_to_transformers",
    "keras_llama.export.transformers.export_causal_lm",
    "keras_llama.export.transformers.export_backbone",
    "keras_llama.export.transformers.export_tokenizer",
    "keras_llama.export.transformers.export_preprocessor",
    "keras_llama.export.gguf.export_causal_lm",
)
CLI_ENTRY_POINTS = ("keras_llama.cli.main", "keras_llama.cli.build_parser")


def public_names():
    """Dotted paths of every public name, as a user imports it."""
    import importlib

    names = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        names += [f"{namespace}.{name}" for name in module.__all__]
    return names + list(EXPORT_ENTRY_POINTS) + list(CLI_ENTRY_POINTS)
