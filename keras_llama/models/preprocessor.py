"""Preprocessors: strings -> model inputs (and back), in plain Python + NumPy.

`CausalLMPreprocessor` reproduces KerasHub's `CausalLMPreprocessor` (and its `StartEndPacker`)
on NumPy arrays. For ``sequence_length=6`` and a 4-token text ``t1 t2 t3 t4``:

    packed (length 7)  <s> t1 t2 t3 t4 </s> pad       mask  1 1 1 1 1 1 0
    x["token_ids"]     <s> t1 t2 t3 t4 </s>           x["padding_mask"]  1 1 1 1 1 1
    y (labels)             t1 t2 t3 t4 </s> pad       sample_weight      1 1 1 1 1 0

Texts longer than the room left by the start/end tokens are truncated before those are added.
"""

import warnings

import keras
import numpy as np

from keras_llama.models.preset_loading import load_preprocessor
from keras_llama.models.preset_saving import save_preprocessor
from keras_llama.models.presets_mixin import PresetsMixin
from keras_llama.tokenizers import ChatPrompt
from keras_llama.utils.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_llama")
class Preprocessor(PresetsMixin):
    """Base class for preprocessors (KerasHub's `keras_hub.models.Preprocessor`).

    A preprocessor holds a `Tokenizer` and turns raw inputs into what a task's backbone
    takes. It is a plain Python object (not a Keras layer) working on NumPy arrays.

    Example:
        ```python
        preprocessor = keras_llama.models.Preprocessor.from_preset(
            "smollm2_135m_instruct", sequence_length=16)
        x, y, sample_weight = preprocessor(["The capital of France is Paris."])
        ```
    """

    backbone_cls = None
    tokenizer_cls = None

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    @property
    def tokenizer(self):
        """The tokenizer used to tokenize strings."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def call(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement `call()`.")

    def get_config(self):
        config = {}
        if self.tokenizer is not None:
            config["tokenizer"] = keras.saving.serialize_keras_object(self.tokenizer)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("name", "trainable", "dtype", "config_file"):  # KerasHub layer keys
            config.pop(key, None)
        if isinstance(config.get("tokenizer"), dict):
            config["tokenizer"] = keras.saving.deserialize_keras_object(config["tokenizer"])
        return cls(**config)

    # --- presets -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Instantiate a preprocessor from a preset (built-in name, ``kaggle://``, ``hf://``,
        a local folder or a ``.gguf`` file). ``kwargs`` override the config, e.g.
        ``sequence_length=256``."""
        return load_preprocessor(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save the preprocessor config and its tokenizer's assets to a preset folder."""
        save_preprocessor(self, preset_dir)


@keras.saving.register_keras_serializable(package="keras_llama")
class CausalLMPreprocessor(Preprocessor):
    """Strings -> ``(x, y, sample_weight)`` for causal language modelling (KerasHub's
    `keras_hub.models.CausalLMPreprocessor`).

    Each text is tokenized and packed to ``sequence_length + 1`` tokens (start token, text
    truncated to fit, end token, then pad ids), and split into inputs and next-token labels:
    ``x = {"token_ids": ids[..., :-1], "padding_mask": mask[..., :-1]}``,
    ``y = ids[..., 1:]``, ``sample_weight = mask[..., 1:]``. A single string gives unbatched
    arrays ``[sequence_length]``; a list gives ``[batch, sequence_length]``. Token ids are
    int32, masks and sample weights bool.

    ``generate_preprocess`` / ``generate_postprocess`` serve `CausalLM.generate()`.

    Args:
        tokenizer: a `Tokenizer` with ``start_token_id``, ``end_token_id``, ``pad_token_id``.
        sequence_length: length of the packed inputs.
        add_start_token: prepend the tokenizer's start token.
        add_end_token: append the tokenizer's end token (training only).

    Example:
        ```python
        preprocessor = keras_llama.models.LlamaCausalLMPreprocessor(tokenizer, sequence_length=8)
        x, y, sample_weight = preprocessor(["The quick brown fox.", "Call me Ishmael."])
        x = preprocessor.generate_preprocess(["The quick brown"])
        ```
    """

    def __init__(self, tokenizer, sequence_length=1024, add_start_token=True, add_end_token=True):
        super().__init__(tokenizer=tokenizer)
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    @property
    def sequence_length(self):
        """The padded length of model input sequences."""
        return self._sequence_length

    @sequence_length.setter
    def sequence_length(self, value):
        self._sequence_length = _check_length(value, "sequence_length")

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        """Tokenize and pack ``x`` for training: returns ``(x, y, sample_weight)``.

        ``x`` is text (a string or a list), or, to train on the answers only:

        - ``{"prompts": ..., "responses": ...}`` (strings or equal-length lists; KerasHub's
          convention): ``sample_weight`` is 0 on the start token and the prompt's tokens, 1 on
          the response's tokens and the end token;
        - a chat, ``[{"role": ..., "content": ...}, ...]``, or a list of chats: rendered with
          the chat template (no end token is appended: the template ends its turns), with
          ``sample_weight`` 1 on the assistant turns only.

        Each part is tokenized on its own, so a token never straddles a prompt and an answer.
        """
        if y is not None or sample_weight is not None:
            warnings.warn(
                f"{type(self).__name__} makes its own labels and sample weights from `x`; "
                "the `y` and `sample_weight` passed in are ignored.",
                stacklevel=2,
            )
        length = self._length(sequence_length)
        segments = self._weighted_segments(x)
        if segments is not None:
            return self._call_weighted(*segments, length)
        # One extra token so that inputs and labels both have `length` tokens.
        token_ids, padding_mask = self._pack(
            self._tokenize(x), length + 1, self.add_start_token, self.add_end_token
        )
        x = {"token_ids": token_ids[..., :-1], "padding_mask": padding_mask[..., :-1]}
        return x, token_ids[..., 1:], padding_mask[..., 1:]

    def generate_preprocess(self, x, sequence_length=None):
        """Tokenize and pack prompts for generation: ``{"token_ids", "padding_mask"}``,
        with the start token (per ``add_start_token``), never an end token, right-padded.

        Unlike KerasHub, which always prepends the start token here, ``add_start_token=False``
        is honoured (a GGUF model with ``add_bos_token = false`` must not get one)."""
        length = self._length(sequence_length)
        token_ids, padding_mask = self._pack(
            self._tokenize(x), length, self.add_start_token, add_end=False
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate_postprocess(self, x):
        """Generated ``{"token_ids", "padding_mask"}`` -> strings: padding and the tokenizer's
        special tokens are dropped, the rest detokenized (a string per row)."""
        token_ids = np.asarray(keras.ops.convert_to_numpy(x["token_ids"]))
        mask = np.asarray(keras.ops.convert_to_numpy(x["padding_mask"])).astype(bool)
        if token_ids.shape != mask.shape:
            raise ValueError(
                "`token_ids` and `padding_mask` must have the same shape. Received: "
                f"token_ids.shape={token_ids.shape}, padding_mask.shape={mask.shape}"
            )
        special = getattr(self.tokenizer, "special_token_ids", [])
        mask = mask & ~np.isin(token_ids, np.asarray(special, dtype=token_ids.dtype))
        if token_ids.ndim == 1:
            return self.tokenizer.detokenize(token_ids[mask].tolist())
        return self.tokenizer.detokenize([row[m].tolist() for row, m in zip(token_ids, mask)])

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Render chat ``messages`` (``[{"role": ..., "content": ...}]``) into one prompt
        string for ``generate()``, with the model's chat template: the checkpoint's own
        (``tokenizer.chat_template``), else a built-in Llama 3, ChatML or Llama 2 template
        picked from the vocabulary. A leading start token is left to this preprocessor.
        The result is a `keras_llama.tokenizers.ChatPrompt` (a ``str``): the tokenizer encodes
        the template's special-token strings (``</s><s>``, ``<|eot_id|>``) as those tokens,
        which it never does for plain user text with a SentencePiece vocabulary.

        Example:
            ```python
            prompt = preprocessor.apply_chat_template([{"role": "user", "content": "Hi!"}])
            causal_lm.generate(prompt, max_length=64, strip_prompt=True)
            ```
        """
        from keras_llama.models.chat_template import apply_chat_template

        return apply_chat_template(
            self, messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token,
            }
        )
        return config

    # --- helpers -------------------------------------------------------------------------
    def export_to_transformers(self, path, overwrite=False):
        """Write the tokenizer's transformers files with ``add_bos_token`` set from
        ``add_start_token`` (see `keras_llama.export.transformers`).

        Args:
            path: the folder for the tokenizer files (other files in it are kept).
            overwrite: allow a folder that already holds files.

        Raises:
            ValueError: for an existing, non-empty ``path`` without ``overwrite``.

        Example:
            ```python
            preprocessor.export_to_transformers("./hf_tokenizer")
            # AutoTokenizer.from_pretrained("./hf_tokenizer") prepends BOS as this does
            ```
        """
        from keras_llama.export import transformers  # export imports models: lazily

        transformers.export_preprocessor(self, path, overwrite)

    # --- prompt/response and chat inputs: loss on the answers only ------------------------------
    def _weighted_segments(self, x):
        """``(batched, rows)`` with each row a list of ``(text, trained)`` segments, for
        ``{"prompts", "responses"}`` dicts and chat message lists; None for plain text."""
        if isinstance(x, dict) and set(x) == {"prompts", "responses"}:
            prompts, responses = x["prompts"], x["responses"]
            batched = not isinstance(prompts, str)
            if not batched:
                prompts, responses = [prompts], [responses]
            if isinstance(responses, str) or len(prompts) != len(responses):
                raise ValueError(
                    "`prompts` and `responses` must both be strings or lists of equal length. "
                    f"Received: {len(prompts)} prompts and "
                    f"{1 if isinstance(responses, str) else len(responses)} responses"
                )
            rows = [[(str(p), False), (str(r), True)] for p, r in zip(prompts, responses)]
            return batched, rows, self.add_end_token
        if _is_conversation(x):
            return False, [self._chat_segments(x)], False
        if isinstance(x, (list, tuple)) and x and all(_is_conversation(c) for c in x):
            return True, [self._chat_segments(c) for c in x], False
        return None

    def _chat_segments(self, messages):
        """A conversation rendered with the chat template, cut where each assistant turn
        starts and ends: ``[(text, trained)]`` with ``trained`` True on the assistant turns
        (their content and the template's end-of-turn text)."""
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            turn = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise ValueError(
                    "The chat template does not render a conversation as a prefix of its "
                    "continuation, so assistant turns cannot be told apart from the prompt. "
                    f"Received: a conversation of {len(messages)} messages"
                )
            segments += [(prompt[len(done) :], False), (turn[len(prompt) :], True)]
            done = turn
        rest = self.apply_chat_template(messages, add_generation_prompt=False)[len(done) :]
        # Pieces of a rendered template keep their control tokens as tokens.
        return [(ChatPrompt(text), train) for text, train in segments + [(rest, False)]]

    def _call_weighted(self, batched, rows, add_end, length):
        """Pack ``rows`` of segments (each tokenized on its own) to ``length + 1`` tokens; a label's weight is 1 when
        its token belongs to a trained segment (or is the end token after one)."""
        start_id, end_id = self.tokenizer.start_token_id, self.tokenizer.end_token_id
        token_ids = np.full((len(rows), length + 1), self.tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), length + 1), bool)
        trained = np.zeros((len(rows), length + 1), bool)
        for r, segments in enumerate(rows):
            ids = [start_id] if self.add_start_token and start_id is not None else []
            weights = [False] * len(ids)
            for text, train in segments:
                if text:
                    piece = self.tokenizer(text).tolist()
                    ids += piece
                    weights += [train] * len(piece)
            if add_end and end_id is not None:
                ids.append(end_id)
                weights.append(True)
            ids, weights = ids[: length + 1], weights[: length + 1]
            token_ids[r, : len(ids)] = ids
            padding_mask[r, : len(ids)] = True
            trained[r, : len(ids)] = weights
        x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        y, sample_weight = token_ids[:, 1:], trained[:, 1:]
        if not batched:
            return {k: v[0] for k, v in x.items()}, y[0], sample_weight[0]
        return x, y, sample_weight

    def _length(self, sequence_length):
        if sequence_length is None:
            return self.sequence_length
        return _check_length(sequence_length, "sequence_length")

    def _tokenize(self, x):
        if self.tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer. Pass one to the constructor or use "
                "`from_preset(...)`. Received: tokenizer=None"
            )
        return self.tokenizer(x)

    def _pack(self, tokens, length, add_start, add_end):
        """KerasHub's StartEndPacker: ``tokens`` (an id array or a list of them) ->
        ``(token_ids, padding_mask)`` of shape ``[length]`` or ``[batch, length]``."""
        batched = isinstance(tokens, list)
        rows = tokens if batched else [tokens]
        # As KerasHub's packer: a tokenizer without a start/end token gets none added.
        start_id, end_id = self.tokenizer.start_token_id, self.tokenizer.end_token_id
        start = [start_id] if add_start and start_id is not None else []
        end = [end_id] if add_end and end_id is not None else []
        room = length - len(start) - len(end)  # >= 0: `length` >= 1 + add_end
        token_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype="int32")
        padding_mask = np.zeros((len(rows), length), dtype=bool)
        for i, row in enumerate(rows):
            packed = start + list(np.asarray(row)[:room]) + end
            token_ids[i, : len(packed)] = packed
            padding_mask[i, : len(packed)] = True
        if not batched:
            return token_ids[0], padding_mask[0]
        return token_ids, padding_mask


def _is_conversation(x):
    """A chat: a non-empty list of ``{"role": ..., "content": ...}`` dicts."""
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)
    )


def _check_length(value, name):
    if isinstance(value, np.integer) and not isinstance(value, np.bool_):
        value = int(value)  # NumPy integers are accepted too
    check_positive_int(name, value)
    return value
