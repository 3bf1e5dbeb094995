"""``keras-llama finetune``: JSON lines in, LoRA fine-tuning with ``fit()``, a preset out.

Each line of the data file is one example, of one of three kinds::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
        chat, rendered with the model's chat template; loss on the assistant turns only
    {"prompt": "...", "completion": "..."}     loss on the completion (and end token) only
    {"text": "..."}                            loss on every token

Every line is checked before the model is loaded: a line that is not JSON, a message without
content or with an unknown role, a record of no known kind, stops with an error naming the file
and the line, and nothing is written. The masks come from the preprocessor
(`CausalLMPreprocessor` with ``{"prompts", "responses"}`` or a message list), training is the
model's own ``fit()`` (its progress bar shows the loss), and the output is a preset folder with
the adapters merged into the weights (or, with ``keep_adapter``, the base weights plus the
adapters in ``adapter.lora.h5``, KerasHub's adapter layout, which ``from_preset`` loads onto the
backbone with the weights).
"""

import json
import os
import shutil

import numpy as np

from keras_llama.presets.keras_format import ADAPTER_FILE

ROLES = ("system", "user", "assistant", "tool")


def read_examples(path):
    """The examples of a JSON-lines file, as preprocessor inputs (a message list, a
    ``{"prompts", "responses"}`` dict, or a string).

    Raises:
        ValueError: naming ``path:line`` for the first bad line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The data file does not exist. Received: {path!r}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg}). Received: {line.strip()[:80]!r}"
                ) from None
            examples.append(_example(record, where))
    if not examples:
        raise ValueError(f"{path}: the file holds no examples.")
    return examples


def _example(record, where):
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object. Received: {type(record).__name__}")
    if "messages" in record:
        return _messages(record["messages"], where)
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(
                    f"{where}: a prompt/completion example needs both as strings. "
                    f"Received: {key}={record.get(key)!r}"
                )
        return {"prompts": record["prompt"], "responses": record["completion"]}
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(
                f"{where}: `text` must be a non-empty string. Received: {record['text']!r}"
            )
        return record["text"]
    raise ValueError(
        f'{where}: expected {{"messages": [...]}}, {{"prompt": ..., "completion": ...}} or '
        f'{{"text": ...}}. Received keys: {sorted(record)}'
    )


def _messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list. Received: {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} is not an object. Received: {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"{where}: message {i} has an unknown role; expected one of {ROLES}. "
                f"Received: role={role!r}"
            )
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError(
                f"{where}: message {i} ({role}) has no content. Received: content={content!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message to learn from.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_arrays(preprocessor, examples):
    """Token ids, labels and sample weights ``[examples, sequence_length]`` for ``fit()``."""
    rows = [preprocessor(example) for example in examples]
    x = {key: np.stack([row[0][key] for row in rows]) for key in ("token_ids", "padding_mask")}
    y = np.stack([row[1] for row in rows])
    weight = np.stack([row[2] for row in rows]).astype("float32")
    empty = [i for i, w in enumerate(weight) if not w.any()]
    if len(empty) == len(rows):
        raise ValueError(
            "No example has a token to learn from within --max-length "
            f"{preprocessor.sequence_length}: the answers are cut off. Raise --max-length."
        )
    return x, y, weight


def _float_weights(preset):
    """LoRA adapters train over float weights or Keras's int8 (QLoRA), not over GGUF's blocks
    kept as stored: a GGUF file is loaded on its float path (``dtype="float32"``)."""
    from keras_llama.models.preset_reading import open_preset
    from keras_llama.presets.checkpoint import Checkpoint

    source = open_preset(preset)
    return (
        {"dtype": "float32"} if isinstance(source, Checkpoint) and source.format == "gguf" else {}
    )


def finetune(preset, data, output, lora_rank=8, epochs=3, learning_rate=2e-4, batch_size=4,
             max_length=512, validation_data=None, keep_adapter=False, overwrite=False,
             callbacks=None, seed=None):  # fmt: skip
    """Fine-tune ``preset`` with LoRA on the JSON-lines file ``data``; write a preset to
    ``output``. ``callbacks`` go to ``fit()``. ``seed``: an int makes the run reproducible
    (`keras.utils.set_random_seed`: the adapters' initial values and the example order);
    None leaves the random state as it is. Returns ``(causal_lm, history)`` (the model saved,
    and ``fit()``'s history)."""
    import keras

    from keras_llama.export.atomic import check_target
    from keras_llama.export.weights import lora_free_copy
    from keras_llama.models import CausalLM

    output = os.path.abspath(os.fspath(output))
    check_target(output, overwrite, folder=True)
    train = read_examples(data)  # every line checked before anything is loaded
    validation = read_examples(validation_data) if validation_data else None
    causal_lm = CausalLM.from_preset(preset, **_float_weights(preset))
    preprocessor = causal_lm.preprocessor
    if preprocessor is None:
        raise ValueError(f"The preset has no tokenizer to read the data with. Received: {preset!r}")
    preprocessor.sequence_length = max_length
    x, y, weight = to_arrays(preprocessor, train)
    if validation is not None:
        validation = to_arrays(preprocessor, validation)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    causal_lm.backbone.enable_lora(lora_rank)
    causal_lm.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = causal_lm.fit(x, y, sample_weight=weight, batch_size=batch_size, epochs=epochs,
                            validation_data=validation, shuffle=True,
                            callbacks=callbacks)  # fmt: skip
    if keep_adapter:
        base = lora_free_copy(causal_lm, merge_lora=False)
        base.save_to_preset(output)
        try:
            causal_lm.backbone.save_lora_weights(os.path.join(output, ADAPTER_FILE))
        except BaseException:  # a folder without its adapters would load as the base model
            shutil.rmtree(output, ignore_errors=True)
            raise
        return causal_lm, history
    merged = lora_free_copy(causal_lm)
    merged.save_to_preset(output)
    return merged, history
