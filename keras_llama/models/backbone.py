"""Backbone base class: a functional Keras model holding a model's core architecture."""

import functools

import keras

from keras_llama import quantization
from keras_llama.models import lora_files
from keras_llama.models.preset_loading import load_backbone
from keras_llama.models.preset_saving import save_backbone
from keras_llama.models.presets_mixin import PresetsMixin
from keras_llama.utils import keras_compat
from keras_llama.utils.python_utils import functional_setattr
from keras_llama.utils.validation import check_positive_int

# KerasHub's default LoRA targets: the query and value projections of every attention block.
DEFAULT_LORA_LAYER_NAMES = ("query_dense", "value_dense", "query", "value")


@keras.saving.register_keras_serializable(package="keras_llama")
class Backbone(PresetsMixin, keras.Model):
    """Base class for backbones (KerasHub's `keras_hub.models.Backbone`).

    A backbone maps preprocessed inputs (``{"token_ids", "padding_mask"}``) to hidden states.
    Subclasses build a functional model in ``__init__`` and list their constructor arguments
    in ``get_config()``. ``from_preset`` picks the subclass named by the preset's config.

    Example:
        ```python
        backbone = keras_llama.models.Backbone.from_preset("smollm2_135m_instruct")
        type(backbone).__name__  # "Llama3Backbone"
        backbone.num_layers       # 30
        ```
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _explain_layout_errors(cls.__dict__["__init__"])

    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._initialized = True
        # Keras functional models take no dtype; remember the policy our layers were built with.
        self._backbone_dtype = keras.dtype_policies.get(dtype) if dtype is not None else None
        # Keras wraps `quantize` per instance to check the mode against its own list, which
        # lacks "int8_weight_only"; our `quantize` validates the mode itself.
        self.__dict__.pop("quantize", None)
        # Layers rebuilt from a quantized config get back what their dtype policy implies.
        for layer in keras_compat.sublayers(self):
            # A layer built from a `DTypePolicyMap` (int8 presets) keeps the whole map as its
            # policy, and parts of Keras read `layer.dtype_policy.quantization_mode` directly
            # (None on a map: saving an int8 ReversibleEmbedding then fails). Give each layer
            # its own entry.
            policy = keras_compat.own_dtype_policy(layer)
            if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and layer.path:
                keras_compat.set_own_dtype_policy(layer, policy[layer.path])
            quantization.apply_layer_hooks(layer)

    def __setattr__(self, name, value):
        functional_setattr(self, Backbone, name, value)

    @property
    def token_embedding(self):
        """A `keras.layers.ReversibleEmbedding` mapping token ids to vectors and back."""
        return self._token_embedding

    @token_embedding.setter
    def token_embedding(self, value):
        self._token_embedding = value

    def get_config(self):
        policy = self._float_dtype_policy()
        # Quantized layers are recorded as a map from layer paths to their quantized policies
        # (KerasHub's int8 preset format), so `from_config` builds quantized variables.
        policy_map = quantization.quantized_policy_map(self, default_policy=policy)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(policy_map or policy),
        }

    def _float_dtype_policy(self):
        policy = self._backbone_dtype or self.dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            policy = policy.default_policy
        return policy

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate a backbone from a preset (built-in name, ``kaggle://``, ``hf://``, a local
        folder or a ``.gguf`` file). ``kwargs`` override the preset's config."""
        return load_backbone(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save the config and weights to a preset folder (atomically)."""
        save_backbone(self, preset_dir)

    def export_to_transformers(self, path, overwrite=False, max_shard_size="5GB"):
        """Write ``config.json``, ``generation_config.json`` and safetensors weights that
        transformers' ``AutoModelForCausalLM.from_pretrained(path)`` loads (LoRA merged;
        sharded above ``max_shard_size``). Atomic; an existing non-empty folder is refused
        unless ``overwrite=True`` (then this export's files in it are replaced, others kept).
        See `keras_llama.export.transformers`.

        Args:
            path: the folder to write.
            overwrite: replace this export's files in an existing, non-empty folder.
            max_shard_size: bytes (int) or a size such as ``"5GB"``.

        Raises:
            ValueError: when ``path`` exists and ``overwrite`` is False, for a quantized
                backbone, or a bad ``max_shard_size``.

        Example:
            ```python
            backbone.export_to_transformers("./hf_model")
            ```
        """
        from keras_llama.export import transformers  # export imports models: lazily

        transformers.export_backbone(self, path, overwrite, max_shard_size)

    # --- quantization --------------------------------------------------------------------------
    @property
    def quantization_scheme(self):
        """The scheme this backbone was quantized with (see `keras_llama.quantization`), or
        None for a float model."""
        return quantization.quantization_mode_of(self)

    def quantize(self, mode=None, config=None, filters=None, quantize_activations=False,
                 block_size=None, **kwargs):  # fmt: skip
        """Quantize the weights in place.

        Args:
            mode: ``"int8"`` (recommended: int8 kernels and embedding with per-output-channel
                scales, float activations; KerasHub's int8 file layout),
                ``"int8_weight_only"`` (the same) or ``"int4"`` (weights only, blocks of 128).
                See `keras_llama.quantization`.
            config: optional `keras.quantizers.QuantizationConfig` passed on to Keras
                (custom quantizers, int4 ``block_size``; an int8 config with an activation
                quantizer gives W8A8).
            filters: optional regex, list of regexes or callable selecting layers, as in
                `keras.Model.quantize`; combined with the scheme's own choice of layers.
            quantize_activations: with ``mode="int8"``: also quantize activations to int8,
                one scale per token (W8A8, KerasHub's int8 math; less accurate, see
                `keras_llama.quantization`). Kept through saving.
            block_size: with ``"int8"`` / ``"int8_weight_only"``: 32 gives one scale per 32
                input values (GGUF's Q8_0 blocks, ``gguf.quants``'s quantizer) instead of one
                per output channel; layers whose input dimension is not a multiple of 32 stay
                float.

        Raises:
            ValueError: for an unknown mode, or a model that is already quantized.
        """
        if mode is None and config is not None:
            mode = config.mode
        quantization.check_mode(mode, quantize_activations, block_size)
        if kwargs:
            raise ValueError(f"Unrecognized keyword arguments to `quantize()`: {kwargs}")
        current = self.quantization_scheme
        if current is not None:
            raise ValueError(
                f"This model is already quantized (mode={current!r}); quantizing twice would "
                "quantize already-rounded weights. Quantize the float model instead (e.g. "
                "reload it from its preset; a GGUF file's blocks are kept as stored unless "
                f'`from_preset(..., dtype="float32")`). Received: mode={mode!r}'
            )
        if block_size is not None:
            if config is not None:
                raise ValueError(f"`config` cannot be combined with `block_size`. Received: "
                                 f"config={config!r}")  # fmt: skip
            return self._quantize_blocks("q8_0", _compile_filters(filters))
        keras_mode, keras_config = quantization.keras_mode_and_config(mode, quantize_activations)
        if config is not None:
            if quantize_activations:
                raise ValueError(
                    "`config` cannot be combined with `quantize_activations=True`; give the "
                    f"activation quantizer in the config instead. Received: config={config!r}"
                )
            keras_config = config
        scheme_filter = quantization.layer_filter(mode)
        user_filter = _compile_filters(filters)

        def keep(layer):
            return scheme_filter(layer) and user_filter(layer)

        with keras_compat.one_garbage_collection():
            keras.Model.quantize(self, keras_mode, config=keras_config, filters=keep)
        if keras_mode == "int8":
            for layer in keras_compat.sublayers(self):
                if getattr(layer, "_is_quantized", False) and getattr(
                    layer, "inputs_quantizer", None
                ):
                    quantization.mark_activations_quantized(layer)

    def _quantize_blocks(self, block_format, user_filter):
        # Setting a layer's policy to a quantized one makes Keras call its `quantize`, which
        # the block layers (`keras_llama.models.block_layers`) implement for block policies.
        with keras_compat.one_garbage_collection():
            for layer in keras_compat.sublayers(self):
                if not hasattr(layer, "block_depth") or not user_filter(layer):
                    continue
                if layer.block_depth() % quantization.BLOCK == 0:
                    source = quantization.resolved_policy(layer).name  # the float policy
                    layer.dtype_policy = quantization.block_policy(block_format, source)

    # --- LoRA ----------------------------------------------------------------------------------
    def default_lora_layer_names(self):
        """Names of the layers `enable_lora` targets by default: query and value projections."""
        return list(DEFAULT_LORA_LAYER_NAMES)

    def enable_lora(self, rank, target_layer_names=None):
        """Freeze every weight and add trainable low-rank adapters to the target layers.

        Each target layer's output becomes ``x @ W + (alpha / rank) * (x @ A) @ B`` with ``W``
        frozen and ``A``, ``B`` trainable float32 (``alpha = rank``); ``B`` starts at zero, so the
        model's outputs are unchanged until training. Works on int8-quantized models too
        (QLoRA-style: frozen int8 ``W``, float ``A`` and ``B``).

        Args:
            rank: int >= 1, the adapters' rank.
            target_layer_names: layer names to adapt (matched against ``layer.name``). Defaults
                to `default_lora_layer_names` (the query and value projections).
        """
        check_positive_int("rank", rank)
        if getattr(self, "_lora_layer_paths", None):
            raise ValueError(
                f"LoRA is already enabled on this model (rank={self._lora_rank}). "
                f"Received: rank={rank}"
            )
        if target_layer_names is None:
            target_layer_names = self.default_lora_layer_names()
        if isinstance(target_layer_names, str):
            target_layer_names = [target_layer_names]
        target_layer_names = list(target_layer_names)
        all_layers = list(keras_compat.sublayers(self))
        targets = [
            layer
            for layer in all_layers
            if layer.name in target_layer_names and hasattr(layer, "enable_lora")
        ]
        found = {layer.name for layer in targets}
        candidates = sorted({layer.name for layer in all_layers if hasattr(layer, "enable_lora")})
        # KerasHub's defaults name both its own and its siblings' layers: only the user's
        # names must all exist.
        unknown = [
            name
            for name in target_layer_names
            if name not in found and name not in DEFAULT_LORA_LAYER_NAMES
        ]
        if unknown or not targets:
            raise ValueError(
                f"Unknown LoRA target layer names {unknown or target_layer_names}: no layer "
                f"supporting LoRA has that name. Layers that do: {candidates}. "
                f"Received: target_layer_names={target_layer_names}"
            )
        self._enable_lora_on(rank, targets)

    def _enable_lora_on(self, rank, targets):
        self.trainable = True
        for layer in keras_compat.sublayers(self):
            layer.trainable = False
        for layer in targets:
            layer.trainable = True
            layer.enable_lora(rank)
        self._lora_rank = rank
        self._lora_layer_paths = [layer.path for layer in targets]

    def save_lora_weights(self, filepath):
        """Write the LoRA adapters and their rank to ``filepath`` in KerasHub's file layout.

        KerasHub's `load_lora_weights` reads the file, and ours reads KerasHub's (see
        `keras_llama.models.lora_files`). Written to a temporary file first, so a failed save
        leaves an existing file intact.

        Args:
            filepath: a path ending in ``.lora.h5``.

        Raises:
            ValueError: LoRA is not enabled, or the name does not end in ``.lora.h5``.

        Example:
        ```python
        causal_lm.backbone.enable_lora(rank=4)
        causal_lm.fit(data, epochs=1)
        causal_lm.backbone.save_lora_weights("adapter.lora.h5")
        ```
        """
        paths = getattr(self, "_lora_layer_paths", None)
        if not paths:
            raise ValueError("There are no LoRA weights to save: call `enable_lora(rank)` first.")
        by_path = {layer.path: layer for layer in keras_compat.sublayers(self)}
        lora_files.save(self, filepath, self._lora_rank, [by_path[p] for p in paths])

    def load_lora_weights(self, filepath):
        """Load LoRA adapters saved by `save_lora_weights` here or in KerasHub.

        When LoRA is not enabled yet, it is enabled (with the file's rank) on exactly the
        layers the file holds adapters for.

        Args:
            filepath: a ``.lora.h5`` file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an adapter file, or one that does not fit this model (another
                rank, other layers, other shapes); nothing is assigned then.

        Example:
        ```python
        causal_lm = keras_llama.models.LlamaCausalLM.from_preset("smollm2_135m_instruct")
        causal_lm.backbone.load_lora_weights("adapter.lora.h5")
        ```
        """
        rank, adapters = lora_files.read(filepath)
        layers = lora_files.resolve(self, filepath, adapters)
        lora_files.check_shapes(filepath, rank, layers, adapters)
        enabled = getattr(self, "_lora_layer_paths", None)
        if enabled and self._lora_rank != rank:
            raise ValueError(
                f"The LoRA file has rank {rank} but LoRA is enabled here with rank "
                f"{self._lora_rank}. Received: {filepath}"
            )
        if enabled:
            not_in_file = sorted(set(enabled) - {layer.path for layer in layers.values()})
            if not_in_file:
                raise ValueError(
                    f"The LoRA file has no adapters for the LoRA layers {not_in_file}. "
                    f"Received: {filepath}"
                )
        else:
            self._enable_lora_on(rank, list(layers.values()))
        for index, layer in layers.items():
            kernel_a, kernel_b = adapters[index]
            layer.lora_kernel_a.assign(kernel_a)
            layer.lora_kernel_b.assign(kernel_b)


class LayoutMapError(ValueError):
    """A distribution's layout map shards a weight over a mesh axis that does not divide it."""


def _explain_layout_errors(init):
    """Wrap a backbone ``__init__`` so that a weight the active distribution cannot shard evenly
    (JAX's ``IndivisibleError``, raised while the layers create their variables) becomes a
    `LayoutMapError` naming the mesh and what to change."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        try:
            return init(self, *args, **kwargs)
        except LayoutMapError:
            raise
        except Exception as e:
            if type(e).__name__ != "IndivisibleError" and "evenly divide" not in str(e):
                raise
            mesh = getattr(keras.distribution.distribution(), "device_mesh", None)
            axes = dict(zip(mesh.axis_names, mesh.shape)) if mesh is not None else "unknown"
            raise LayoutMapError(
                "The distribution's layout map does not fit this model: a weight dimension is "
                f"not divisible by the size of the mesh axis it is sharded over (mesh axes: "
                f"{axes}). Use a mesh axis size that divides the sharded dimensions (for "
                "`get_layout_map`: num_query_heads, num_key_value_heads, vocabulary_size and "
                f"intermediate_dim). Received: {type(e).__name__}: {e}"
            ) from e

    return wrapped


def _compile_filters(filters):
    """`keras.Model.quantize`'s ``filters`` (regex, list of regexes, callable, None) as a
    predicate on layers."""
    import re

    if filters is None:
        return lambda layer: True
    if callable(filters):
        return filters
    if isinstance(filters, str):
        filters = [filters]
    if not isinstance(filters, (list, tuple)):
        raise ValueError(
            "`filters` must be a regex string, a list of regex strings or a callable. "
            f"Received: filters={filters!r}"
        )
    patterns = [re.compile(f) for f in filters]
    return lambda layer: any(p.search(layer.path or layer.name) for p in patterns)
