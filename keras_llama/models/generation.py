"""`generate()` and `stream()` as a chain of short stages.

::

    inputs ─normalize_inputs─> batches ─preprocess─> Prompts (numpy rows)
           ─GenerationEngine.prefill─> DecodeState ─GenerationEngine.decode─> DecodeState
           ─sampler.finalize─> generated tokens ─postprocess─> text, or token arrays

The engine prefills each batch once over its real prompt length: ragged prompts are
left-padded, the padding slots are masked out of the cache and each row's rotary positions start
at 0, so every row generates exactly what it would alone. Decoding then feeds one token per step
through THE loop of `keras_llama.samplers.sampler`. The engine (compiled prefill and decode,
run by the model's execution plan) is in `keras_llama.models.generation_engine`.
"""

import numpy as np
from keras import ops

from keras_llama import samplers as samplers_lib
from keras_llama.models.generation_engine import Prompts
from keras_llama.utils.validation import is_tf_dataset

# Steps decoded per compiled call while streaming (1: each token is shown as soon as it exists).
STREAM_CHUNK = 1


# --- stage 1: inputs -> batches ------------------------------------------------------------------
def normalize_inputs(inputs):
    """``(batches, is_scalar)``: a list or iterator of batches (a list of strings or a token
    dict each), and whether the input was a single string."""
    if isinstance(inputs, (str, bytes)):
        return [[_to_str(inputs)]], True
    if isinstance(inputs, dict):
        return [inputs], False
    if is_tf_dataset(inputs):
        return (_batch_from_tf(batch) for batch in inputs.as_numpy_iterator()), False
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("`generate()` needs at least one prompt. Received: inputs=[]")
        if all(isinstance(x, (str, bytes)) for x in inputs):
            return [[_to_str(x) for x in inputs]], False
    if hasattr(inputs, "__iter__"):
        return (_normalize_batch(batch) for batch in inputs), False
    raise ValueError(
        "`generate()` expects a string, a list of strings, a dict with `token_ids` (and "
        "`padding_mask`), or an iterable of such batches. "
        f"Received: inputs of type {type(inputs).__name__}"
    )


def _normalize_batch(batch):
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, (str, bytes)):
        return [_to_str(batch)]
    if isinstance(batch, np.ndarray) and batch.dtype.kind in "USO":
        batch = batch.tolist()
    if (
        isinstance(batch, (list, tuple))
        and batch
        and all(isinstance(x, (str, bytes)) for x in batch)
    ):
        return [_to_str(x) for x in batch]
    raise ValueError(
        "Each batch must be a non-empty list of strings or a dict with `token_ids`. "
        f"Received: batch={batch!r}"
    )


def _batch_from_tf(batch):
    if isinstance(batch, dict):
        return {k: np.asarray(v) for k, v in batch.items()}
    return _normalize_batch(np.atleast_1d(batch))


def _to_str(x):
    return x.decode("utf-8") if isinstance(x, bytes) else x


# --- stage 2: batch -> Prompts -------------------------------------------------------------------
def preprocess(model, batch, max_length):
    """Tokenizes a batch of strings with the preprocessor, or reads a token dict."""
    if max_length is not None and (
        isinstance(max_length, bool)
        or not isinstance(max_length, (int, np.integer))
        or max_length < 2
    ):
        raise ValueError(
            f"`max_length` must be an integer >= 2. Received: max_length={max_length!r}"
        )
    if isinstance(batch, dict):
        if "token_ids" not in batch:
            raise ValueError(
                "A dict input needs a `token_ids` entry (and optionally `padding_mask`). "
                f"Received keys: {sorted(batch)}"
            )
        token_ids = np.asarray(ops.convert_to_numpy(batch["token_ids"]))
        mask = batch.get("padding_mask")
        mask = (
            np.ones(token_ids.shape, bool)
            if mask is None
            else np.asarray(ops.convert_to_numpy(mask))
        )
        if token_ids.ndim != 2 or mask.shape != token_ids.shape:
            raise ValueError(
                "`token_ids` and `padding_mask` must both be [batch, length]. Received: "
                f"token_ids.shape={token_ids.shape}, padding_mask.shape={mask.shape}"
            )
        max_length = token_ids.shape[1] if max_length is None else int(max_length)
        _check_context(model, max_length)
    else:
        preprocessor = model.preprocessor
        if preprocessor is None:
            raise ValueError(
                "`generate()` received text, but the model has no `preprocessor`. Attach one, or "
                "pass token ids as {'token_ids': ..., 'padding_mask': ...}."
            )
        if max_length is None:  # the preprocessor's default, within the model's context
            max_length = min(preprocessor.sequence_length, _context(model))
        max_length = int(max_length)
        _check_context(model, max_length)
        x = preprocessor.generate_preprocess(batch, sequence_length=max_length)
        token_ids = np.asarray(ops.convert_to_numpy(x["token_ids"]))
        mask = np.asarray(ops.convert_to_numpy(x["padding_mask"]))
    return _prompts_from_arrays(model, token_ids.astype("int32"), mask.astype(bool), max_length)


def _context(model):
    return getattr(model, "max_sequence_length", None) or float("inf")


def _check_context(model, max_length):
    """Refuse a length beyond the model's context before any cache is allocated for it."""
    limit = _context(model)
    if max_length > limit:
        raise ValueError(
            f"`max_length` must be at most the model's context length, "
            f"max_sequence_length={limit} (set `max_sequence_length` on the model to change the "
            f"limit). Received: max_length={max_length}"
        )


def _prompts_from_arrays(model, token_ids, mask, max_length):
    rows = [ids[m] for ids, m in zip(token_ids, mask)]
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError(
            f"Every prompt needs at least one token. Received: an empty prompt at row "
            f"{lengths.index(0)}"
        )
    if max_length <= max(lengths):
        raise ValueError(
            "`max_length` is the total length (prompt + completion) and must be larger than the "
            f"longest prompt, which has {max(lengths)} tokens (truncated to max_length if it was "
            f"longer). Received: max_length={max_length}"
        )
    vocabulary_size = model.backbone.vocabulary_size
    bad = token_ids[mask & ((token_ids < 0) | (token_ids >= vocabulary_size))]
    if bad.size:
        raise ValueError(
            f"Token ids must be in [0, {vocabulary_size}). Received: token id {int(bad[0])}"
        )
    return Prompts(rows=rows, max_length=int(max_length))


def resolve_stop_token_ids(model, stop_token_ids):
    """The stop ids as a tuple (``()`` for none), validated against the vocabulary."""
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        if model.preprocessor is None:
            raise ValueError(
                '`stop_token_ids="auto"` needs a `preprocessor` (its tokenizer knows the end '
                "token), but the model has `preprocessor=None`. Pass `stop_token_ids=None` to "
                "generate up to `max_length`, or a tuple of token ids to stop on."
            )
        stop_token_ids = auto_stop_token_ids(model.preprocessor.tokenizer)
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, (int, np.integer)) and not isinstance(stop_token_ids, bool):
        stop_token_ids = (stop_token_ids,)
    if not isinstance(stop_token_ids, (list, tuple)):
        raise ValueError(
            '`stop_token_ids` must be "auto", None or a tuple of token ids. '
            f"Received: stop_token_ids={stop_token_ids!r}"
        )
    vocabulary_size = model.backbone.vocabulary_size
    for token_id in stop_token_ids:
        if (
            isinstance(token_id, bool)
            or not isinstance(token_id, (int, np.integer))
            or not 0 <= token_id < vocabulary_size
        ):
            raise ValueError(
                f"Stop token ids must be integers in [0, {vocabulary_size}) (the vocabulary). "
                f"Received: stop_token_ids={tuple(stop_token_ids)!r}"
            )
    return tuple(int(t) for t in stop_token_ids)


def auto_stop_token_ids(tokenizer):
    """The tokenizer's end token plus any extra stop tokens it declares (Llama 3's
    ``<|eot_id|>``), in order, without duplicates."""
    ids = [getattr(tokenizer, "end_token_id", None)]
    ids.append(getattr(tokenizer, "end_token2_id", None))  # KerasHub's name for the second one
    ids.extend(getattr(tokenizer, "stop_token_ids", None) or ())
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise ValueError(
            '`stop_token_ids="auto"` found no end token on the tokenizer. Pass the stop ids '
            "explicitly, or None."
        )
    return tuple(dict.fromkeys(ids))


# --- stage 5: postprocess ------------------------------------------------------------------------
def postprocess(model, prompts, result, strip_prompt, text):
    """Token arrays ``{"token_ids", "padding_mask"}`` [batch, max_length] (prompt then
    completion, or only the completion with ``strip_prompt``; tokens after a stop token are
    padding), or their text through the preprocessor when the batch was text."""
    tokens, counts = result["tokens"], result["num_generated"]
    beams = tokens.shape[1] if tokens.ndim == 3 else None
    if beams:  # every beam of a prompt shares the prompt
        tokens, counts = tokens.reshape(-1, tokens.shape[-1]), counts.reshape(-1)
    rows = [r for r in prompts.rows for _ in range(beams or 1)]
    token_ids = np.zeros((len(rows), prompts.max_length), "int32")
    padding_mask = np.zeros((len(rows), prompts.max_length), bool)
    for i, (prompt, generated) in enumerate(zip(rows, tokens)):
        sequence = generated[: counts[i]]
        if not strip_prompt:
            sequence = np.concatenate([prompt, sequence])
        token_ids[i, : len(sequence)] = sequence
        padding_mask[i, : len(sequence)] = True
    out = {"token_ids": token_ids, "padding_mask": padding_mask}
    if text:
        out = model.preprocessor.generate_postprocess(out)
        out = [out] if isinstance(out, str) else [_to_str(x) for x in out]
        if beams:
            return [out[i : i + beams] for i in range(0, len(out), beams)]
        return out
    if beams:
        out = {k: v.reshape(-1, beams, v.shape[-1]) for k, v in out.items()}
        out["scores"] = result["scores"]
    return out


def concatenate_outputs(outputs, is_scalar):
    """Joins the outputs of every batch: lists of text, or dicts of arrays (padded to the
    widest batch)."""
    if not outputs:
        raise ValueError("`generate()` received an iterable with no batches.")
    if isinstance(outputs[0], list):
        joined = [x for out in outputs for x in out]
        return joined[0] if is_scalar else joined
    if len(outputs) == 1:
        return outputs[0]
    width = max(out["token_ids"].shape[-1] for out in outputs)

    def pad(x):
        extra = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
        return np.pad(x, extra) if x.ndim > 1 and x.dtype != np.float32 else x

    return {k: np.concatenate([pad(out[k]) for out in outputs]) for k in outputs[0]}


# --- the public entry points ---------------------------------------------------------------------
def generate(model, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
    """See `CausalLM.generate`."""
    engine = model.make_generate_function()
    stop_ids = resolve_stop_token_ids(model, stop_token_ids)
    batches, is_scalar = normalize_inputs(inputs)
    outputs = []
    for batch in batches:
        prompts = preprocess(model, batch, max_length)
        result = engine.run(prompts, stop_ids)
        outputs.append(
            postprocess(model, prompts, result, strip_prompt, not isinstance(batch, dict))
        )
    return concatenate_outputs(outputs, is_scalar)


def stream(model, prompt, max_length=None, stop_token_ids="auto"):
    """See `CausalLM.stream`. Validates eagerly, then returns the iterator."""
    if not isinstance(prompt, (str, bytes)):
        raise ValueError(
            "`stream()` takes a single prompt string. Received: "
            f"inputs of type {type(prompt).__name__}"
        )
    engine = model.make_generate_function()
    stop_ids = resolve_stop_token_ids(model, stop_token_ids)
    prompts = preprocess(model, [_to_str(prompt)], max_length)
    return _stream_text(model, engine, prompts, stop_ids)


def _stream_text(model, engine, prompts, stop_ids):
    if isinstance(engine.sampler, samplers_lib.BeamSampler):
        # The best beam is only known at the end: the whole completion comes as one piece.
        result = engine.run(prompts, stop_ids)
        yield postprocess(model, prompts, result, True, True)[0]
        return
    text = _IncrementalText(lambda ids: _detokenize(model, ids))
    for ids in stream_token_ids(engine, prompts, stop_ids):
        piece = text.update(ids)
        if piece:
            yield piece
    piece = text.update(ids, final=True)
    if piece:
        yield piece


def stream_token_ids(engine, prompts, stop_ids, chunk=STREAM_CHUNK):
    """Yields the generated token ids of a one-row batch (a growing numpy array) after every
    ``chunk`` steps, driving the same compiled decode loop as `generate`."""
    state, steps = engine.prefill(prompts, stop_ids)
    index = 0
    while True:
        index = min(index + chunk, steps)
        state = engine.decode(state, index, stop_ids)
        result = engine.sampler.finalize(state)
        yield result["tokens"][0, : result["num_generated"][0]]
        if index >= steps or bool(ops.convert_to_numpy(state.done).all()):
            return


def _detokenize(model, ids):
    out = model.preprocessor.generate_postprocess(
        {
            "token_ids": np.asarray(ids, "int32")[None, :],
            "padding_mask": np.ones((1, len(ids)), bool),
        }
    )
    return _to_str(out if isinstance(out, (str, bytes)) else out[0])


class _IncrementalText:
    """Turns a growing token sequence into text pieces without splitting a character.

    The whole sequence is detokenized each time and only the new, stable part is emitted: an
    incomplete UTF-8 sequence at the end detokenizes to U+FFFD and is held back until the
    bytes that complete it arrive (or generation ends).
    """

    def __init__(self, detokenize):
        self.detokenize = detokenize
        self.emitted = ""

    def update(self, ids, final=False):
        text = self.detokenize(ids) if len(ids) else ""
        if not final:
            text = text.rstrip("\ufffd")
        if not text.startswith(self.emitted):
            return ""  # the detokenizer revised earlier text (rare): wait for it to settle
        piece, self.emitted = text[len(self.emitted) :], text
        return piece
