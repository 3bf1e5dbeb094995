"""What runs where: an execution plan, decided once, passed along, printable.

A model is written once (one decoder block, one attention layer). What varies between ways of
running it is a small set of strategies, and a plan names one of each for every stage:

* ``projections``: how the dense projections multiply. ``"layers"`` calls the Keras layers
  (any dtype policy, quantization or LoRA); ``"training_matmuls"`` multiplies each layer's
  kernel with written-out gradients (`keras_llama.kernels.training_matmul`); ``"fused"``
  multiplies the query/key/value and gate/up kernels concatenated (fewer, larger XLA matmuls);
  ``"packed"`` multiplies packed weights in the native decode op; ``"matrices"`` multiplies
  each float kernel viewed as a [K, N] matrix with ``ops.matmul`` (torch decoding).
* ``attention``: ``"einsum"`` (grouped einsums, any backend, dropout), ``"dot_product"``
  (`jax.nn.dot_product_attention`), ``"native"`` (the native flash-style op),
  ``"single_query"`` (one query per row against the key/value caches, for decoding) or
  ``"native_single_query"`` (the same in the native op, reading only the filled positions).
* ``activation``: ``"layers"`` (inside the gate layer, or ``activation(gate) * up``) or
  ``"native_swiglu"``.
* ``head`` (the vocabulary projection): ``"layers"``, ``"training_matmuls"`` or ``"packed"``.
* ``loss`` (training only): ``"xla"`` or ``"native"`` cross-entropy.
* ``step`` (decode only): ``"xla_loop"`` (JAX: the whole loop is one compiled while-loop),
  ``"torch_compile"`` (torch: the per-token step traced and compiled once per shape, see
  `keras_llama.models.torch_step`) or ``"eager"``.

Every choice records why it was made, so ``print(causal_lm.execution_plan())`` answers "which
path runs, and why" without reading code.
"""

import dataclasses

STAGES = ("prefill", "decode", "training", "scoring")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One decision of a plan: the strategy picked for ``part`` and why."""

    part: str
    strategy: str
    reason: str

    def __str__(self):
        return f"{self.part}: {self.strategy} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """How one stage (``"prefill"``, ``"decode"``, ``"training"`` or ``"scoring"``) runs.

    A frozen, hashable value: it can be a static argument of a compiled function. Each part
    (``plan.projections``, ``plan.attention``, ``plan.head``, ...) reads as the name of the
    strategy chosen for it; ``str(plan)`` lists them with their reasons.

    Example:
        ```python
        decode = causal_lm.execution_plan().decode
        decode.attention   # "single_query"
        print(decode)      # "decode:" then one line per part, with its reason
        ```
    """

    stage: str
    choices: tuple

    def __getattr__(self, part):
        # ``plan.attention`` -> the strategy name chosen for "attention".
        if part.startswith("__"):
            raise AttributeError(part)
        for choice in self.choices:
            if choice.part == part:
                return choice.strategy
        raise AttributeError(f"{self.stage} plan has no choice for {part!r}")

    def __str__(self):
        return "\n".join([f"{self.stage}:"] + [f"  {choice}" for choice in self.choices])


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """The plan of every stage of a model; ``str()`` lists each choice and its reason.

    Made once by ``causal_lm.execution_plan()`` from the model (backend, dtype, quantization,
    LoRA, an active ``keras.distribution``) and the native libraries' status, then passed to
    every traced function. ``stage(name)`` returns one stage's `StagePlan`.

    Args:
        prefill: the `StagePlan` of running a prompt through the model, filling the caches.
        decode: the `StagePlan` of one token per row against the caches.
        training: the `StagePlan` of ``fit()``.
        scoring: the `StagePlan` of ``score()`` and ``perplexity()``.

    Example:
        ```python
        plan = causal_lm.execution_plan()
        print(plan)                        # every stage, each choice with its reason
        plan.stage("training").attention   # e.g. "native" on JAX CPU
        ```
    """

    prefill: StagePlan
    decode: StagePlan
    training: StagePlan
    scoring: StagePlan

    def stage(self, name):
        if name not in STAGES:
            raise ValueError(f"`stage` must be one of {STAGES}. Received: stage={name!r}")
        return getattr(self, name)

    def __str__(self):
        return "\n".join(str(self.stage(name)) for name in STAGES)
