"""Argument checks shared across the package (TEMPORARY: replaced by the frontdoor branch)."""

import sys


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def is_tf_dataset(inputs):
    tf = sys.modules.get("tensorflow")  # only if the user already imported TensorFlow
    return tf is not None and isinstance(inputs, tf.data.Dataset)
