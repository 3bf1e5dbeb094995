"""Feeding raw strings to ``fit()``/``evaluate()``/``predict()`` through a task's preprocessor.

Keras takes arrays, ``keras.utils.PyDataset``, Python generators and ``tf.data``; none of them
runs our (pure Python) preprocessor. `adapt` wraps whatever the user passed so that each batch
goes through the preprocessor just before Keras sees it:

=============================  =================================================================
user input                     what Keras receives
=============================  =================================================================
strings (list, numpy array,    a `PreprocessedArrays` PyDataset: batches of ``batch_size``
dict of them) [+ y, weights]   strings, reshuffled each epoch when ``shuffle``
`keras.utils.PyDataset`        a `PreprocessedPyDataset` preprocessing each item
Python generator / iterator    a generator preprocessing each item (one pass, as Keras's own)
``tf.data.Dataset``            re-iterated each epoch as numpy (bytes decoded to ``str``);
                               TensorFlow is never imported here
anything else (token ids)      passed through unchanged
=============================  =================================================================

Items already holding token ids (integers) pass through the wrappers untouched.
"""

import math
import types

import keras
import numpy as np

from keras_llama.utils.validation import check_positive_int, is_tf_dataset


def adapt(preprocessor, x, y=None, sample_weight=None, batch_size=None, shuffle=False):
    """Return ``(x, y, sample_weight, batch_size)`` ready for `keras.Model.fit` & co.

    Raises:
        ValueError: on an empty dataset.
    """
    _check_not_empty(x)
    if preprocessor is None:
        if _is_string_data(x):
            raise ValueError(
                "`x` holds strings but this model has no preprocessor to tokenize them. Attach "
                "one (`model.preprocessor = ...`) or pass token ids. "
                f"Received: x={_preview(x)}"
            )
        return x, y, sample_weight, batch_size
    if _is_string_data(x):
        dataset = PreprocessedArrays(
            preprocessor, x, y, sample_weight, batch_size=batch_size or 32, shuffle=shuffle
        )
        return dataset, None, None, None
    if isinstance(x, keras.utils.PyDataset):
        return PreprocessedPyDataset(preprocessor, x), y, sample_weight, None
    if is_tf_dataset(x):
        num_batches = _tf_cardinality(x)
        if num_batches is None:  # unknown length: one pass, as Keras does for generators
            return (
                _preprocess_generator(preprocessor, x.as_numpy_iterator()),
                y,
                sample_weight,
                None,
            )
        return PreprocessedIterable(preprocessor, x, num_batches), y, sample_weight, None
    if isinstance(x, (types.GeneratorType, map, filter)) or (
        hasattr(x, "__next__") and hasattr(x, "__iter__")
    ):
        return _preprocess_generator(preprocessor, x), y, sample_weight, None
    return x, y, sample_weight, batch_size


def adapt_validation_data(preprocessor, validation_data, batch_size=None):
    """`adapt` for ``fit(validation_data=...)``: a dataset, strings, or an ``(x, y[, w])``
    tuple."""
    if validation_data is None or preprocessor is None:
        return validation_data
    if isinstance(validation_data, tuple) and not _is_string_data(validation_data):
        x, y, w = (tuple(validation_data) + (None, None))[:3]
        if not _is_string_data(x):
            return validation_data
    else:
        x, y, w = validation_data, None, None
    x, y, w, _ = adapt(preprocessor, x, y, w, batch_size=batch_size)
    if y is None and w is None:
        return x
    return (x, y, w)


class PreprocessedArrays(keras.utils.PyDataset):
    """Batches of in-memory strings (plus optional ``y``/``sample_weight``) run through a
    preprocessor. ``shuffle`` draws a new sample order every epoch."""

    def __init__(self, preprocessor, x, y=None, sample_weight=None, batch_size=32, shuffle=False):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        self.preprocessor = preprocessor
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_samples = _num_samples(x)
        self._order = np.arange(self.num_samples)
        # From numpy's global state, so that `keras.utils.set_random_seed` fixes the order too.
        self._rng = np.random.default_rng(np.random.randint(2**31 - 1))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch index out of range. Received: index={index}")
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = [_take(part, rows) for part in (self.x, self.y, self.sample_weight)]
        return preprocess_batch(self.preprocessor, *batch)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(self.num_samples)


class PreprocessedPyDataset(keras.utils.PyDataset):
    """A user's `keras.utils.PyDataset` whose items go through a preprocessor."""

    def __init__(self, preprocessor, dataset):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.preprocessor = preprocessor
        self.dataset = dataset

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return preprocess_item(self.preprocessor, self.dataset[index])

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()


class PreprocessedIterable(keras.utils.PyDataset):
    """A re-iterable source (``tf.data.Dataset``) read in order, one pass per epoch.

    Keras asks for items by index; this reads them from an iterator restarted at index 0, so
    it must run in one worker thread (the default)."""

    def __init__(self, preprocessor, iterable, num_batches):
        super().__init__()
        self.preprocessor = preprocessor
        self.iterable = iterable
        self._num_batches = num_batches
        self._iterator = None
        self._next_index = 0

    @property
    def num_batches(self):
        return self._num_batches

    def __len__(self):
        return self._num_batches

    def __getitem__(self, index):
        # Keras shuffles the order it asks in when `fit(shuffle=True)`: the source is expected
        # to be shuffled already (as for tf.data), so items are served in reading order.
        if self._iterator is None or index == 0 and self._next_index:
            self._iterator = iter(_numpy_iterable(self.iterable))
            self._next_index = 0
        self._next_index += 1
        return preprocess_item(self.preprocessor, next(self._iterator))

    def on_epoch_end(self):
        self._iterator = None
        self._next_index = 0


def _preprocess_generator(preprocessor, iterator):
    for item in iterator:
        yield preprocess_item(preprocessor, item)


def preprocess_item(preprocessor, item):
    """One batch from a dataset: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``;
    run through the preprocessor when ``x`` holds strings."""
    if isinstance(item, tuple):
        parts = tuple(item) + (None,) * (3 - len(item))
        x, y, w = parts[:3]
    else:
        x, y, w = item, None, None
    x = _decode_bytes(x)
    if not _is_string_data(x):
        return item
    return preprocess_batch(preprocessor, x, y, w)


def preprocess_batch(preprocessor, x, y=None, sample_weight=None):
    """Call the preprocessor and return a numpy ``(x, y, sample_weight)`` tuple (shortened
    when the trailing entries are None), as `keras.utils.PyDataset` items must be."""
    x = _decode_bytes(x)
    if y is None and sample_weight is None:
        out = preprocessor(x)
    else:
        out = preprocessor(x, y, sample_weight)
    if not isinstance(out, tuple):
        out = (out,)
    out = tuple(keras.tree.map_structure(_to_numpy, part) for part in out)
    while len(out) > 1 and out[-1] is None:
        out = out[:-1]
    return out


# --- helpers -------------------------------------------------------------------------------------
def _preview(x):
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _to_numpy(value):
    if value is None or isinstance(value, np.ndarray):
        return value
    return keras.ops.convert_to_numpy(value)


def _is_string(value):
    return isinstance(value, (str, bytes, np.str_, np.bytes_))


def _is_string_data(x):
    """True for a string, a list/tuple/array of strings, or a dict of those (``{"prompts",
    "responses"}``)."""
    if _is_string(x):
        return True
    if isinstance(x, dict):
        return bool(x) and all(_is_string_data(v) for v in x.values())
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return True
        return x.dtype == object and x.size > 0 and _is_string(x.reshape(-1)[0])
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(_is_string(v) for v in x)
    return False


def _decode_bytes(x):
    """tf.data yields bytes; preprocessors take ``str``."""
    if isinstance(x, dict):
        return {k: _decode_bytes(v) for k, v in x.items()}
    if isinstance(x, (bytes, np.bytes_)):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and (
        x.dtype.kind == "S" or (x.dtype == object and x.size and isinstance(x.flat[0], bytes))
    ):
        return [v.decode("utf-8") for v in x.reshape(-1)]
    return x


def _num_samples(x):
    if x is None:
        return None
    if isinstance(x, dict):
        sizes = {k: _num_samples(v) for k, v in x.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"All inputs must have the same number of samples. Received sizes: {sizes}"
            )
        return next(iter(sizes.values()), 0)
    if _is_string(x):
        return 1
    if hasattr(x, "shape") and len(x.shape):
        return int(x.shape[0])
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def _take(part, rows):
    if part is None:
        return None
    if isinstance(part, dict):
        return {k: _take(v, rows) for k, v in part.items()}
    if _is_string(part):
        return [part]
    if isinstance(part, (list, tuple)):
        return [part[i] for i in rows]
    return np.asarray(part)[rows]


def _check_not_empty(x):
    if x is None:
        return
    empty = False
    if isinstance(x, keras.utils.PyDataset):
        empty = x.num_batches == 0
    elif is_tf_dataset(x):
        empty = _tf_cardinality(x) == 0
    elif isinstance(x, (list, tuple, dict, np.ndarray)) or hasattr(x, "shape"):
        empty = _num_samples(x) == 0
    if empty:
        raise ValueError(
            "The dataset is empty: there is nothing to train on or evaluate. "
            f"Received: x={_preview(x)} with 0 samples"
        )


def _tf_cardinality(dataset):
    """The number of batches of a tf.data.Dataset, or None when unknown/infinite."""
    n = int(dataset.cardinality())
    return n if n >= 0 else None


def _numpy_iterable(dataset):
    return dataset.as_numpy_iterator() if is_tf_dataset(dataset) else dataset
