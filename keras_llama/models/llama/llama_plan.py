"""How a Llama model runs each stage: the plan (`make_plan`) and the routes it gives each block.

`make_plan` looks at the model (backend, dtypes, quantization, LoRA, dropout, distribution)
and at which native ops are built, and returns an `ExecutionPlan` with a reason for every
choice. It never builds a native op unless asked to (``build``): inside a traced function it
only reads their status, so a build never starts while JAX traces. Callers that run outside
tracing (``generate()``, ``compile()``/``fit()``, ``score()``, ``execution_plan()``) ask.

A stage's plan is then turned into one `BlockRoute` per block (`block_routes`) and a vocabulary
projection (`project_to_vocabulary`); decoding with fused or packed weights first makes them
from the variables (`decode_weights`, once per weight change, passed to the compiled loop).
"""

from keras import ops

from keras_llama import kernels
from keras_llama.kernels import decode_matmul, packing, training_matmul
from keras_llama.kernels import swiglu as native_swiglu
from keras_llama.models import torch_step
from keras_llama.models.execution_plan import Choice, ExecutionPlan, StagePlan
from keras_llama.models.llama import llama_cache, llama_strategies
from keras_llama.quantization import block_format_of

# The native libraries (`keras_llama.kernels.library`) each stage may use.
NATIVE_OPS = {
    "prefill": ("decode_matmul",),
    "decode": ("decode_matmul", "attention"),
    "training": ("attention", "swiglu", "cross_entropy"),
    "scoring": ("attention",),
}


# --- the plan -----------------------------------------------------------------------------------
def make_plan(backbone, build=()):
    """The `ExecutionPlan` of a Llama backbone (and its tied or untied vocabulary head).

    ``build``: names of native libraries to build first, if not built yet (see
    `keras_llama.kernels.library`); the others are only asked for their status."""
    for name in build:
        if kernels.enabled():
            kernels.library(name).ensure_built()
    facts = _Facts(backbone)
    return ExecutionPlan(
        prefill=_prefill(facts),
        decode=_decode(facts),
        training=_training(facts),
        scoring=_scoring(facts),
    )


class _Facts:
    """What the choices depend on, read once."""

    def __init__(self, backbone):
        import keras

        self.backbone = backbone
        self.backend = keras.config.backend()
        self.jax_cpu = self.backend == "jax" and _jax_platform() == "cpu"
        self.distributed = keras.distribution.distribution() is not None
        blocks = backbone.transformer_layers
        self.blocks = blocks
        self.float32 = all(block.compute_dtype == "float32" for block in blocks)
        self.projection_layers = [layer for block in blocks for layer in _dense_layers(block)]
        self.plain = packing.is_plain(*self.projection_layers)
        self.dropout = any(block.dropout > 0 for block in blocks)
        self.head_dim = backbone.hidden_dim // backbone.num_query_heads
        self.embedding = backbone.token_embedding

    def native(self, name):
        """``(usable, reason)`` for the native library ``name``."""
        if not kernels.enabled():
            return False, kernels.library(name).status().reason
        if self.distributed:
            return False, "a keras.distribution is active (XLA cannot partition a native op)"
        status = kernels.library(name).status()
        return bool(status.available), status.reason

    def plain_reason(self):
        kinds = sorted({_weight_kind(layer) for layer in self.projection_layers} - {"float"})
        return f"projections are {', '.join(kinds)}"


def _jax_platform():
    import jax

    return jax.default_backend()


def _dense_layers(block):
    attention = block._self_attention_layer
    return (
        attention._query_dense,
        attention._key_dense,
        attention._value_dense,
        attention._output_dense,
        block._feedforward_gate_dense,
        block._feedforward_intermediate_dense,
        block._feedforward_output_dense,
    )


def _weight_kind(layer):
    if getattr(layer, "lora_enabled", False):
        return "LoRA"
    return block_format_of(layer) or layer.quantization_mode or "float"


def _multi_token_attention(facts, training):
    """The attention of a stage without a cache (training, scoring)."""
    if facts.backend != "jax":
        return Choice(
            "attention",
            "einsum",
            f"dot-product attention is used on JAX only, backend is {facts.backend}",
        )
    if training and facts.dropout:
        return Choice("attention", "einsum", "attention dropout needs the probabilities")
    usable, reason = facts.native("attention")
    if not facts.float32:
        usable, reason = False, "weights compute in " + facts.blocks[0].compute_dtype
    elif facts.head_dim % 16:
        usable, reason = False, f"head_dim {facts.head_dim} is not a multiple of 16"
    if usable:
        return Choice("attention", "native", "native flash attention: float32 on JAX CPU")
    return Choice("attention", "dot_product", f"native attention: no, {reason}")


# Packed kinds whose native products are fast for many rows too (the integer dot products of
# `block_dot.cc`); the others are decode-only (XLA's matmuls win from a few rows on).
_PREFILL_KINDS = ("q4_blocks_int16_dot", "q8_blocks_int16_dot")


def _prefill_projections(facts):
    if facts.backend == "jax" and _decode(facts).projections == "packed":
        kind = packing.packable_mode(facts.projection_layers)
        if kind in _PREFILL_KINDS:
            why = f"native block kernels: yes, {kind} weights packed (the decode weights)"
            return Choice("projections", "packed", why)
    return Choice("projections", "layers", "multi-token products: the layers' own matmuls")


def _prefill(facts):
    attention = (
        Choice("attention", "dot_product", "multi-token attention on JAX")
        if facts.backend == "jax"
        else Choice("attention", "einsum", f"backend is {facts.backend}")
    )
    return StagePlan(
        "prefill",
        (_prefill_projections(facts), attention, Choice("head", "layers", "last position only")),
    )


def _decode_attention(facts):
    """Decoding attention: the native op where it applies (JAX CPU, float32), else XLA's."""
    if facts.backend != "jax":
        return Choice("attention", "single_query", "one query per row against the caches")
    usable, reason = facts.native("attention")
    groups = facts.backbone.num_query_heads // facts.backbone.num_key_value_heads
    if not facts.float32:
        usable, reason = False, "weights compute in " + facts.blocks[0].compute_dtype
    elif facts.head_dim % 16:
        usable, reason = False, f"head_dim {facts.head_dim} is not a multiple of 16"
    elif groups > 16:
        usable, reason = False, f"{groups} query heads per key/value head (at most 16)"
    if usable:
        why = "native decode attention: yes, reads the caches up to the last filled position"
        return Choice("attention", "native_single_query", why)
    return Choice("attention", "single_query", f"native decode attention: no, {reason}")


def _decode(facts):
    attention = _decode_attention(facts)
    if facts.backend != "jax":
        head = Choice("head", "layers", "the embedding's own reverse projection")
        if facts.plain:
            # EinsumDense's einsums reach torch as batch-1 bmm's, which Inductor lowers to its
            # own slow reductions on CPU; the same kernels as [K, N] views reach the BLAS mm.
            projections = Choice(
                "projections", "matrices", "plain float kernels as [K, N] matrices, one matmul each"
            )
        else:
            projections = Choice("projections", "layers", facts.plain_reason())
        return StagePlan("decode", (projections, attention, head, _decode_step(facts)))
    usable, reason = facts.native("decode_matmul")
    packable = packing.packable_mode(facts.projection_layers)
    head_mode = packing.packable_embedding_mode(facts.embedding)
    if usable and packable and head_mode:
        why = f"native decode matmuls: yes, {packable} weights packed"
        projections = Choice("projections", "packed", why)
        head = Choice("head", "packed", f"native decode matmuls: yes, {head_mode} head packed")
    elif facts.plain:
        why = "native decode matmuls: no, " + (
            reason if not usable else "some weights cannot be packed"
        )
        projections = Choice("projections", "fused", why + "; q/k/v and gate/up concatenated")
        head = Choice("head", "layers", "the embedding's own reverse projection")
    else:
        why = facts.plain_reason()
        projections = Choice("projections", "layers", why)
        head = Choice("head", "layers", why)
    return StagePlan("decode", (projections, attention, head, _decode_step(facts)))


def _decode_step(facts):
    """How the per-token step runs: inside one compiled JAX loop, compiled by torch, or eager."""
    if facts.backend == "jax":
        return Choice("step", "xla_loop", "the whole decode loop is one jax.jit while_loop")
    if facts.backend != "torch":
        return Choice("step", "eager", f"no compiler for backend {facts.backend}")
    reason = torch_step.unavailable_reason()
    if reason:
        return Choice("step", "eager", f"torch.compile: no, {reason}")
    return Choice(
        "step",
        "torch_compile",
        "traced once per shape (make_fx), compiled by torch.compile, writing the static cache "
        "in place",
    )


def _training(facts):
    if facts.jax_cpu and facts.plain:
        projections = Choice("projections", "training_matmuls", "plain float weights on JAX CPU")
    elif not facts.jax_cpu:
        projections = Choice(
            "projections", "layers", "written-out matmul gradients are for XLA:CPU"
        )
    else:
        projections = Choice("projections", "layers", facts.plain_reason())
    activation = Choice("activation", "layers", "inside the gate layer")
    if projections.strategy == "training_matmuls":
        usable, reason = facts.native("swiglu")
        if not facts.float32:
            usable, reason = False, "weights compute in " + facts.blocks[0].compute_dtype
        elif not all(llama_strategies.is_silu(block) for block in facts.blocks):
            usable, reason = False, "the activation is not SiLU"
        activation = (
            Choice("activation", "native_swiglu", "native SwiGLU: float32 on JAX CPU")
            if usable
            else Choice("activation", "layers", f"native SwiGLU: no, {reason}")
        )
    embedding = facts.embedding
    head_plain = (
        packing.is_plain(embedding)
        and embedding.reverse_dtype is None
        and embedding.logit_soft_cap is None
    )
    if facts.jax_cpu and head_plain:
        head = Choice("head", "training_matmuls", "plain float embedding on JAX CPU")
    else:
        head = Choice("head", "layers", "the embedding's own reverse projection")
    return StagePlan(
        "training", (projections, _multi_token_attention(facts, True), activation, head)
    )


def _scoring(facts):
    return StagePlan(
        "scoring",
        (
            Choice("projections", "layers", "the layers' own matmuls"),
            _multi_token_attention(facts, False),
            Choice("head", "layers", "the embedding's own reverse projection"),
        ),
    )


# --- every plan a stage can run ---------------------------------------------------------------
def alternatives(backbone, stage):
    """Every plan ``stage`` can run for this model on this machine: the chosen plan first, then
    the chosen plan with one choice swapped for each other applicable strategy. (Tests run the
    same references over each.)"""
    facts = _Facts(backbone)
    chosen = make_plan(backbone).stage(stage)
    plans = [chosen]
    for part, strategies in _applicable(facts, stage).items():
        for strategy in strategies:
            if strategy != getattr(chosen, part):
                plan = with_choice(chosen, part, strategy)
                if plan not in plans:
                    plans.append(plan)
    return plans


def _applicable(facts, stage):
    jax = facts.backend == "jax"
    attention = ["einsum"]
    if jax and not (stage == "training" and facts.dropout):
        attention.append("dot_product")
        native = _multi_token_attention(facts, stage == "training").strategy == "native"
        attention += ["native"] if native else []
    if stage == "prefill":
        packed = _prefill_projections(facts).strategy == "packed"
        return {
            "attention": attention[:2],
            "projections": ["layers"] + (["packed"] if packed else []),
        }
    if stage == "decode":
        projections = ["layers"] + (["fused"] if jax and facts.plain else [])
        projections += ["matrices"] if not jax and facts.plain else []
        if _decode(facts).projections == "packed":
            projections.append("packed")
        compiles = facts.backend == "torch" and not torch_step.unavailable_reason(False)
        steps = ["eager"] + (["torch_compile"] if compiles else [])
        native = _decode_attention(facts).strategy == "native_single_query"
        attention = ["single_query"] + (["native_single_query"] if native else [])
        return {
            "projections": projections,
            "attention": attention,
            "step": steps if facts.backend == "torch" else [],
        }
    if stage == "scoring":
        return {"attention": attention}
    matrices = facts.jax_cpu and facts.plain
    swiglu = _training(facts).activation == "native_swiglu"
    return {
        "projections": ["layers"] + (["training_matmuls"] if matrices else []),
        "attention": attention,
        "activation": ["layers"] + (["native_swiglu"] if swiglu else []),
        "head": ["layers"] + (["training_matmuls"] if _training(facts).head != "layers" else []),
    }


def with_choice(stage_plan, part, strategy):
    """``stage_plan`` with ``part`` run by ``strategy`` (and the choices that go with it)."""
    choices = {c.part: c for c in stage_plan.choices}
    choices[part] = Choice(part, strategy, "chosen by the caller")
    # Choices that go together: the decode head is packed exactly when the projections are;
    # the native SwiGLU gates the training matmuls' outputs only.
    if stage_plan.stage == "decode":
        head = "packed" if choices["projections"].strategy == "packed" else "layers"
        choices["head"] = Choice("head", head, "goes with the projections")
    if "activation" in choices and choices["projections"].strategy != "training_matmuls":
        choices["activation"] = Choice("activation", "layers", "goes with the projections")
    return StagePlan(stage_plan.stage, tuple(choices.values()))


# --- from a plan to what runs -------------------------------------------------------------------
def block_routes(stage_plan, backbone, weights=None):
    """One `BlockRoute` per block for ``stage_plan``; ``weights`` from `decode_weights` for
    the ``"fused"`` and ``"packed"`` projections."""
    attention = llama_strategies.ATTENTION[stage_plan.attention]()
    in_place = getattr(stage_plan, "step", None) == "torch_compile"
    write_cache = torch_step.write_cache_in_place if in_place else llama_cache.update
    routes = []
    for i, block in enumerate(backbone.transformer_layers):
        projections = _projections(
            stage_plan, block, None if weights is None else weights["layers"][i]
        )
        routes.append(llama_strategies.BlockRoute(projections, attention, write_cache))
    return routes


def _projections(stage_plan, block, weights):
    kind = stage_plan.projections
    if kind == "layers":
        return llama_strategies.LayerProjections()
    if kind == "matrices":
        return llama_strategies.MatrixProjections(
            _separate_matrices(block), ops.matmul, llama_strategies.gated_activation(block)
        )
    if kind == "training_matmuls":
        activation = (
            native_swiglu.swiglu
            if stage_plan.activation == "native_swiglu"
            else llama_strategies.gated_activation(block)
        )
        return llama_strategies.MatrixProjections(
            _separate_matrices(block), training_matmul.matmul, activation
        )
    matmul = decode_matmul.matmul if kind == "packed" else ops.matmul
    return llama_strategies.MatrixProjections(
        weights, matmul, llama_strategies.gated_activation(block)
    )


def _separate_matrices(block):
    attention = block._self_attention_layer
    layers = {
        "query": attention._query_dense,
        "key": attention._key_dense,
        "value": attention._value_dense,
        "gate": block._feedforward_gate_dense,
        "up": block._feedforward_intermediate_dense,
        "down": block._feedforward_output_dense,
    }
    matrices = {name: packing.dense_matrix(layer, 1) for name, layer in layers.items()}
    matrices["output"] = packing.dense_matrix(attention._output_dense, 2)
    return matrices


def decode_weights(stage_plan, backbone):
    """The weights the decode loop multiplies, made from the current variable values (so a
    `keras.StatelessScope` applies): ``{"layers": [per block], "head": packed or None}`` for
    ``"fused"`` and ``"packed"`` projections, None for ``"layers"``. Made part by part (see
    `decode_weight_parts`)."""
    parts = decode_weight_parts(stage_plan, backbone)
    if parts is None:
        return None
    *blocks, (embedding, head) = parts
    return {"layers": [make(block) for block, make in blocks], "head": head(embedding)}


def decode_weight_parts(stage_plan, backbone):
    """`decode_weights` as ``[(layer, make), ...]``: one pair per block, then the token
    embedding's (``make(layer)`` gives that layer's part), or None for ``"layers"``. The
    generation engine makes the blocks' parts with one compiled program when the blocks are
    alike, one block at a time."""
    kind = stage_plan.projections
    if kind in ("layers", "matrices"):
        return None
    block_part = _fused_matrices if kind == "fused" else _packed_block
    blocks = [(block, block_part) for block in backbone.transformer_layers]
    return blocks + [(backbone.token_embedding, _head_part(kind))]


def _packed_block(block):
    dense = dict(
        zip(("query", "key", "value", "output", "gate", "up", "down"), _dense_layers(block))
    )
    return {
        "qkv": packing.pack_dense([dense["query"], dense["key"], dense["value"]], 1),
        "output": packing.pack_dense([dense["output"]], 2),
        "gate_up": packing.pack_dense([dense["gate"], dense["up"]], 1),
        "down": packing.pack_dense([dense["down"]], 1),
    }


def _head_part(kind):
    if kind == "fused":
        return lambda embedding: None
    return packing.pack_reverse_embedding


def _fused_matrices(block):
    # q/k/v and gate/up concatenated along their outputs: fewer, larger matmuls per step,
    # and fewer kernels to compile.
    matrices = _separate_matrices(block)
    return {
        "qkv": ops.concatenate([matrices.pop(n) for n in ("query", "key", "value")], axis=1),
        "gate_up": ops.concatenate([matrices.pop(n) for n in ("gate", "up")], axis=1),
        **matrices,
    }


def project_to_vocabulary(stage_plan, embedding, hidden, weights=None):
    """Logits [..., vocabulary] of ``hidden`` [..., m] by the plan's ``head``."""
    kind = stage_plan.head
    if kind == "packed":
        return decode_matmul.matmul(hidden, weights["head"])
    if kind == "training_matmuls":
        hidden = ops.cast(hidden, embedding.compute_dtype)
        if embedding.tie_weights:
            table = ops.cast(embedding.embeddings, embedding.compute_dtype)
            return training_matmul.matmul_transposed(hidden, table)
        kernel = ops.cast(embedding.reverse_embeddings, embedding.compute_dtype)
        return training_matmul.matmul(hidden, kernel)
    return embedding(hidden, reverse=True)
