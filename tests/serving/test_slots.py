"""`SlotEngine` directly: a decode step runs only the leading rows up to the last active one
(bucketed), and every request still gets its solo greedy output."""

import threading

import numpy as np

from keras_llama.models.llama import llama_plan
from keras_llama.serving.slots import Request, SlotEngine, row_buckets
from tests.serving.conftest import MAX_MODEL_LEN, MERGES, SPECIAL, VOCAB
from tests.tiny_models import tiny_llama3_lm


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(3) == [3]
    assert row_buckets(8) == [1, 2, 8]
    assert row_buckets(16) == [1, 2, 4, 16]


def _solo_ids(lm, prompt, max_tokens):
    out = lm.generate({"token_ids": np.array([prompt], "int32")},
                      max_length=len(prompt) + max_tokens, stop_token_ids=None, strip_prompt=True)  # fmt: skip
    return [int(t) for t in out["token_ids"][0][out["padding_mask"][0]]]


def _record_decode_calls(engine):
    """``[(num_steps, rows)]`` of the engine's decode calls after its warm-up ones."""
    calls, run_decode = [], engine._run_decode

    def recording(num_steps, active=None, rows=None):
        if active is not None:  # not the warm-up calls of start()
            calls.append((num_steps, rows))
        return run_decode(num_steps, active, rows)

    engine._run_decode = recording
    return calls


def _run_until_finished(engine, done, count):
    """Starts ``engine`` and waits (at most 120 s each) for ``count`` releases of ``done``."""
    engine.start()
    try:
        for _ in range(count):
            assert done.acquire(timeout=120)
    finally:
        engine.stop()


def _decode_plans(lm):
    # The model's plan with each decode plan this machine can run (the XLA and the native
    # decode attention: a step over the leading rows reads the whole caches' first rows).
    chosen = lm.execution_plan()
    return [chosen.__class__(chosen.prefill, decode, chosen.training, chosen.scoring)
            for decode in llama_plan.alternatives(lm.backbone, "decode")]  # fmt: skip


def test_partial_row_steps_keep_each_request_solo_output_over_every_plan():
    # Head size 16 (the served tiny model's is 8): the native decode attention applies too.
    lm = tiny_llama3_lm(VOCAB, MERGES, SPECIAL, MAX_MODEL_LEN, seed=1, hidden_dim=64)
    plans = _decode_plans(lm)
    attentions = {plan.decode.attention for plan in plans}
    assert {"single_query", "native_single_query"} <= attentions
    for plan in plans:
        _partial_row_steps_keep_each_request_solo_output(lm, plan)


def _partial_row_steps_keep_each_request_solo_output(tiny_lm, plan):
    engine = SlotEngine(
        tiny_lm, max_batch_size=8, max_model_len=MAX_MODEL_LEN, prefill_chunk=32, plan=plan
    )
    calls = _record_decode_calls(engine)
    # Rows 0, 1, 2 finish last to first: steps of all 8 rows, then of 2, then of 1.
    jobs = [([5, 9, 14, 3], 24), ([7, 7, 21], 12), ([30, 4, 11, 2, 8], 5)]
    results = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def deliver(i):
        def on_event(event):
            if event[0] == "token":
                results[i].append(event[1])
            else:
                done.release()

        return on_event

    for i, (prompt, max_tokens) in enumerate(jobs):
        engine.submit(Request(prompt, max_tokens, {}, (), deliver(i)))
    _run_until_finished(engine, done, len(jobs))
    for (prompt, max_tokens), got in zip(jobs, results):
        assert got == _solo_ids(tiny_lm, prompt, max_tokens), plan.decode
    assert {1, 2, 8} <= {rows for _, rows in calls}


def test_runs_of_several_steps_end_each_request_where_it_ends_alone(tiny_lm):
    # Runs of 4 steps: A stops at a stop token and B at max_tokens in the middle of a run (their
    # later tokens of that run are dropped), C arrives while runs go on and waits at most one.
    engine = SlotEngine(tiny_lm, max_batch_size=2, max_model_len=MAX_MODEL_LEN, steps_per_run=4)
    calls = _record_decode_calls(engine)
    solo_a = _solo_ids(tiny_lm, [5, 9, 14, 3], 20)
    stop = solo_a[6]
    expected_a = solo_a[: solo_a.index(stop)]
    jobs = [([5, 9, 14, 3], 20, {stop}), ([7, 7, 21], 11, set()), ([30, 4, 11], 9, set())]
    results = [[] for _ in jobs]
    finishes = [None] * len(jobs)
    done = threading.Semaphore(0)

    def deliver(i):
        def on_event(event):
            if event[0] == "token":
                results[i].append(event[1])
                if i == 1 and len(results[1]) == 2:  # from the engine thread, mid-run
                    prompt, max_tokens, stop_ids = jobs[2]
                    engine.submit(Request(prompt, max_tokens, {}, stop_ids, deliver(2)))
            else:
                finishes[i] = event[:2]
                done.release()

        return on_event

    for i in range(2):
        prompt, max_tokens, stop_ids = jobs[i]
        engine.submit(Request(prompt, max_tokens, {}, stop_ids, deliver(i)))
    _run_until_finished(engine, done, len(jobs))
    assert results[0] == expected_a and finishes[0] == ("finish", "stop")
    assert results[1] == _solo_ids(tiny_lm, [7, 7, 21], 11) and finishes[1] == ("finish", "length")
    assert results[2] == _solo_ids(tiny_lm, [30, 4, 11], 9) and finishes[2] == ("finish", "length")
    assert {1, 4} <= {num_steps for num_steps, _ in calls}


def test_logprobs_are_computed_when_one_row_asks(tiny_lm):
    engine = SlotEngine(tiny_lm, max_batch_size=2, max_model_len=MAX_MODEL_LEN, prefill_chunk=32)
    events = [[], []]
    done = threading.Semaphore(0)

    def deliver(i):
        return lambda e: events[i].append(e) if e[0] == "token" else done.release()

    engine.submit(Request([5, 9, 14], 12, {"logprobs": True}, (), deliver(0)))
    engine.submit(Request([7, 3], 12, {}, (), deliver(1)))
    _run_until_finished(engine, done, 2)
    for _, token, logprob, top_ids, top_lps in events[0]:  # greedy: the top token is chosen
        assert top_ids[0] == token and logprob < 0 and np.isclose(logprob, top_lps[0])
    assert [e[1] for e in events[1]] == _solo_ids(tiny_lm, [7, 3], 12)


def test_a_chunk_wider_than_the_room_is_split(tiny_lm):
    # 540 tokens at most: 607 slots. A 520-token chunk is padded to 640: it goes in two.
    engine = SlotEngine(tiny_lm, max_batch_size=2, max_model_len=540, prefill_chunk=540)
    assert engine.cache_length == 607
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 40, 520)]
    got, done = [], threading.Semaphore(0)
    on_event = lambda e: got.append(e[1]) if e[0] == "token" else done.release()  # noqa: E731
    widths, prefill = [], engine._prefill_jit
    engine._prefill_jit = lambda *args: (widths.append(args[4].shape[1]), prefill(*args))[1]
    engine.submit(Request(prompt, 6, {}, (), on_event))
    _run_until_finished(engine, done, 1)
    assert widths == [512, 16] and engine.stats["prompt_tokens"] == 520
    assert got == _solo_ids(tiny_lm, prompt, 6)


def test_compaction_keeps_each_request_solo_output(tiny_lm):
    # 64 tokens at most: 96 slots; every decode step moves the shared write pointer by one.
    # A runs alone, B joins at A's 20th token, C at B's 30th (queued until A's row is free):
    # the pointer reaches the end of the cache while B and C are mid-answer, and each row's
    # valid slots are moved to the front.
    engine = SlotEngine(tiny_lm, max_batch_size=2, max_model_len=64, prefill_chunk=32)
    assert engine.cache_length == 96
    jobs = [([5, 9, 14, 3, 8, 8, 2, 30, 4, 11], 50), ([7, 7, 21, 6] * 5, 40), ([12, 3, 9], 45)]
    results = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def deliver(i):
        def on_event(event):
            if event[0] == "token":
                results[i].append(event[1])
                if i < 2 and len(results[i]) == (20, 30)[i]:  # from the engine thread
                    prompt, max_tokens = jobs[i + 1]
                    engine.submit(Request(prompt, max_tokens, {}, (), deliver(i + 1)))
            else:
                assert event[0] == "finish", event
                done.release()

        return on_event

    engine.submit(Request(jobs[0][0], jobs[0][1], {}, (), deliver(0)))
    _run_until_finished(engine, done, len(jobs))
    assert engine.stats["compactions"] >= 1
    for (prompt, max_tokens), got in zip(jobs, results):
        assert got == _solo_ids(tiny_lm, prompt, max_tokens)
