"""Beam search."""

import keras
import numpy as np
from keras import ops

from keras_llama.samplers.sampler import (
    PAD_TOKEN,
    Sampler,
    advance,
    feed,
    repeat_rows,
    take_rows,
)
from keras_llama.utils.validation import check_positive_int

# Log-probability standing in for "impossible" (finite, so that sums never give NaN).
_IMPOSSIBLE = -1e9


@keras.saving.register_keras_serializable(package="keras_llama")
class BeamSampler(Sampler):
    """Beam search: keeps the ``num_beams`` sequences of highest total log-probability.

    Each step extends every beam by every token and keeps the best ``num_beams`` of the
    ``num_beams * vocab`` candidates per prompt. A beam that has stopped (stop token or length
    limit) keeps its score and competes unchanged. Scores are not length-normalised (as in
    KerasHub). ``num_beams=1`` is greedy search.

    Loop state: rows are ``batch * num_beams`` (beam-major within a prompt); ``state.extra`` is
    the beams' total log-probabilities, float32 [batch * num_beams].

    Args:
        num_beams: int >= 1.
        return_all_beams: bool. If True, ``generate()`` returns every beam, best first: token
            outputs gain a beam axis after the batch axis plus ``"scores"`` [batch, num_beams];
            text outputs are a list of ``num_beams`` strings per prompt.
        **kwargs: passed to `Sampler`: ``temperature``, a float > 0 (default 1.0).

    Example:
        ```python
        causal_lm.compile(sampler=keras_llama.samplers.BeamSampler(num_beams=4))
        ```
    """

    def __init__(self, num_beams=5, return_all_beams=False, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_beams", num_beams)
        self.num_beams = num_beams
        self.return_all_beams = bool(return_all_beams)

    def init_state(self, state, prompt_hidden):
        # Every beam starts as a copy of its prompt; only beam 0 is live, so that the first step
        # does not pick the same continuation num_beams times.
        beams = self.num_beams
        batch = state.tokens.shape[0]
        repeat = lambda x: repeat_rows(x, beams, batch)  # noqa: E731
        fields = {k: v for k, v in state._asdict().items() if k not in ("index", "extra")}
        state = state._replace(**keras.tree.map_structure(repeat, fields))
        batch = state.tokens.shape[0] // beams
        first = np.full((batch, beams), _IMPOSSIBLE, "float32")
        first[:, 0] = 0.0
        return state._replace(extra=ops.convert_to_tensor(first.reshape(-1)))

    def step(self, state, step_fn, stop_token_ids):
        beams = self.num_beams
        rows, vocabulary_size = state.logits.shape
        batch = rows // beams
        log_probs = ops.log_softmax(ops.cast(state.logits, "float32") / self.temperature, axis=-1)
        # A stopped beam has one continuation, PAD_TOKEN, which leaves its score unchanged.
        frozen = ops.where(ops.arange(vocabulary_size) == PAD_TOKEN, 0.0, _IMPOSSIBLE)
        log_probs = ops.where(state.done[:, None], frozen[None, :], log_probs)
        candidates = ops.reshape(state.extra[:, None] + log_probs, (batch, beams * vocabulary_size))
        scores, flat = ops.top_k(candidates, k=beams, sorted=True)  # [batch, beams]
        source_beam = flat // vocabulary_size
        token = ops.reshape(flat % vocabulary_size, (-1,))
        source_rows = ops.reshape(ops.arange(batch)[:, None] * beams + source_beam, (-1,))

        rows = state.tokens.shape[0]
        take = lambda x: take_rows(x, source_rows, rows)  # noqa: E731
        state = state._replace(
            caches=keras.tree.map_structure(take, state.caches),
            tokens=take(state.tokens),
            num_generated=take(state.num_generated),
            done=take(state.done),
        )
        logits, hidden, caches = feed(state, token, step_fn)
        return advance(
            state,
            token,
            stop_token_ids,
            logits=logits,
            hidden=hidden,
            caches=caches,
            extra=ops.reshape(scores, (-1,)),
        )

    def finalize(self, state):
        beams = self.num_beams
        tokens = ops.convert_to_numpy(state.tokens)
        batch = tokens.shape[0] // beams
        tokens = tokens.reshape(batch, beams, -1)
        lengths = ops.convert_to_numpy(state.num_generated).reshape(batch, beams)
        scores = ops.convert_to_numpy(state.extra).reshape(batch, beams)
        order = np.argsort(-scores, axis=1, kind="stable")  # best first
        tokens = np.take_along_axis(tokens, order[:, :, None], axis=1)
        lengths = np.take_along_axis(lengths, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if self.return_all_beams:
            return {"tokens": tokens, "num_generated": lengths, "scores": scores}
        return {"tokens": tokens[:, 0], "num_generated": lengths[:, 0]}

    def get_config(self):
        return {
            **super().get_config(),
            "num_beams": self.num_beams,
            "return_all_beams": self.return_all_beams,
        }
