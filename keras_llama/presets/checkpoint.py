"""The plain data every checkpoint reader returns.

A reader (one module per on-disk format) turns files into a `Checkpoint`: backbone keyword
arguments, a *function* yielding ``(our_variable_path, numpy array)`` one tensor at a time (so
that loading never holds the whole checkpoint twice), a `TokenizerSpec`, preprocessor settings
and the chat template. `keras_llama.models.preset_loading` turns that data into model objects.
Weights, and what only the weights tell (a Meta checkpoint's shapes), are read when first asked
for: loading a tokenizer reads only the tokenizer's files.
"""

import dataclasses
import functools
from typing import Callable, Iterator, Optional

# Which model classes a checkpoint pairs with. "llama": a SentencePiece vocabulary
# (LlamaBackbone / LlamaTokenizer / ...); "llama3": a byte-level BPE vocabulary
# (Llama3Backbone / Llama3Tokenizer / ...). The networks are identical.
FAMILIES = ("llama", "llama3")


@dataclasses.dataclass
class TokenizerSpec:
    """What a tokenizer is built from. ``kind`` says what ``data`` holds:

    - ``"sentencepiece"``: ``{"proto": bytes}`` (a serialized SentencePiece ModelProto).
    - ``"sentencepiece_pieces"``: the arguments of
      `keras_llama.tokenizers.sentencepiece_tokenizer.build_sentencepiece_proto` (``pieces``,
      ``scores``, ``types``, ``unk_id``, ``bos_id``, ``eos_id``, ``pad_id``, ...), as GGUF
      stores a SentencePiece model.
    - ``"byte_level_bpe"``: ``{"tokens": [str], "merges": ["a b", ...], "types": [int],
      "pre": str}`` as GGUF stores a GPT-2 style vocabulary (``pre`` names the pre-tokenizer,
      e.g. ``"llama-bpe"``, ``"smollm"``).
    - ``"tokenizer_json"``: ``{"path": str}``, a Hugging Face ``tokenizer.json``.
    - ``"tiktoken"``: ``{"path": str}``, Meta's Llama 3 ``tokenizer.model`` (base64 BPE ranks).

    ``start_token`` / ``end_token`` / ``pad_token`` are token strings (None when unknown);
    ``stop_tokens`` lists further end-of-turn tokens (e.g. ``<|eot_id|>``).
    """

    kind: str
    data: dict
    start_token: Optional[str] = None
    end_token: Optional[str] = None
    pad_token: Optional[str] = None
    stop_tokens: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read from disk, as plain data.

    Attributes:
        source: the handle the user gave (for error messages).
        path: the local folder or file it resolved to.
        format: ``"huggingface"``, ``"gguf"`` or ``"meta"``.
        family: ``"llama"`` or ``"llama3"`` (see `FAMILIES`).
        read_config: ``read_config()`` returns `LlamaBackbone` keyword arguments (read once,
            when `backbone_config` is first asked for).
        read_weights: ``read_weights(backbone_config)`` yields ``(variable_path, array)``
            for every weight, one at a time; ``backbone_config`` is the final config (after
            user overrides) so converters can reshape with it.
        tokenizer: a `TokenizerSpec`, or None when the checkpoint has no tokenizer.
        preprocessor: preprocessor keyword arguments the checkpoint implies, e.g.
            ``{"add_start_token": False}`` from ``add_bos_token=false``.
        chat_template: the checkpoint's Jinja chat template, or None.
        context_length: the longest sequence the model was made for (Hugging Face
            ``max_position_embeddings``, GGUF ``llama.context_length``), or None when unknown.
    """

    source: str
    path: str
    format: str
    family: str
    read_config: Callable[[], dict]
    read_weights: Callable[[dict], Iterator]
    tokenizer: Optional[TokenizerSpec] = None
    preprocessor: dict = dataclasses.field(default_factory=dict)
    chat_template: Optional[str] = None
    context_length: Optional[int] = None

    @functools.cached_property
    def backbone_config(self):
        """`LlamaBackbone` keyword arguments."""
        return self.read_config()
