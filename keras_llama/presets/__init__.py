"""Where presets come from, and one module per on-disk checkpoint format.

Converters return plain data (backbone config kwargs, ``{variable_path: numpy array}``); they
never import `keras_llama.models`.
"""
