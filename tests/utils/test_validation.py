"""The shared input checks in `keras_llama.utils.validation`."""

import re
import sys

import numpy as np
import pytest

from keras_llama.utils.validation import (
    check_positive_int,
    check_token_ids,
    concrete_values,
    is_tf_dataset,
)


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None, np.int64(2)])
def test_check_positive_int_refuses(value):
    message = re.escape(f"`n` must be a positive integer. Received: n={value!r}")
    with pytest.raises(ValueError, match=message):
        check_positive_int("n", value)


def test_check_positive_int_accepts():
    for value in (1, 7, 2**40):
        check_positive_int("n", value)


def test_is_tf_dataset_without_tensorflow():
    # Lists, arrays and generators are never datasets; TensorFlow is not imported to find out.
    loaded = "tensorflow" in sys.modules
    for x in ([1, 2], np.zeros(3), (i for i in range(2)), None):
        assert is_tf_dataset(x) is False
    assert ("tensorflow" in sys.modules) == loaded


def test_check_token_ids_names_the_id_and_the_vocabulary_size():
    check_token_ids(np.array([[0, 5, 99]]), 100)
    for bad in (-1, 100):
        ids = np.array([[3, bad, 4]])
        with pytest.raises(ValueError, match=rf"size 100\. Received: token id {bad}$"):
            check_token_ids(ids, 100)


def test_concrete_values_of_traced_and_symbolic_inputs_are_unknown():
    import jax
    import keras

    assert concrete_values(keras.KerasTensor((1, 3), "int32")) is None
    seen = []
    jax.jit(lambda x: seen.append(concrete_values(x)) or x)(np.ones(3, "int32"))
    assert seen == [None]
    np.testing.assert_array_equal(concrete_values(jax.numpy.arange(3)), [0, 1, 2])
