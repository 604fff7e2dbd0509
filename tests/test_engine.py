"""DLMEngine: batching invariance against generate() alone, cancellation, admission,
per-step limits, streaming, validation. Plain sync tests driving asyncio.run."""
from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.detokenizer import IncrementalText
from serve.engine.engine import DLMEngine, StepStats
from serve.engine.requests import BLOCK, DEFAULT_REMASKING, FINISHED, TOKENS, EngineError, EngineOverloaded, \
    GenerationRequest, RequestError, RequestOutput
from sinkprune.dlm.generate import generate
from tests.conftest import MASK_ID, PAD_ID, random_model

EOS_ID = 1
POLICIES = {"llada": ["low_confidence", "random"], "dream": ["maskgit_plus", "topk_margin", "entropy", "origin"]}


class CharTokenizer:
    """Token i is the character chr(32 + i); EOS, pad and mask are special."""

    special = {EOS_ID, PAD_ID, MASK_ID}

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) - 32 for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(chr(32 + i) for i in ids if not (skip_special_tokens and i in self.special))


def reference(model, request: GenerationRequest, seed: int) -> list[int]:
    """What generate() gives for this request alone, cut at EOS as the engine cuts it."""
    steps = request.steps or request.max_tokens
    out = generate(model, [list(request.prompt)], steps=steps, gen_length=request.max_tokens,
                   block_length=request.block_length or request.max_tokens, temperature=request.temperature,
                   remasking=request.remasking or DEFAULT_REMASKING[model.config.model_type],
                   threshold=request.threshold,
                   generator=torch.Generator().manual_seed(seed), prefix_cache=bool(request.prefix_cache),
                   dual_cache=bool(request.dual_cache))
    tokens = out.completions()[0].tolist()
    if not request.ignore_eos and EOS_ID in tokens:
        tokens = tokens[:tokens.index(EOS_ID)]
    return tokens


def random_requests(model_type: str, count: int, temperature: float, rng: random.Random) -> list[GenerationRequest]:
    requests = []
    for i in range(count):
        cache = rng.choice(["none", "prefix", "dual"])
        max_tokens = rng.choice([4, 8, 16])
        block_length = rng.choice([b for b in (2, 4, 8, 16) if max_tokens % b == 0])
        blocks = max_tokens // block_length
        steps = rng.choice([s for s in range(blocks, max_tokens + 1, blocks)])
        requests.append(GenerationRequest(
            prompt=[rng.randrange(2, 90) for _ in range(rng.randint(1, 12))], max_tokens=max_tokens, steps=steps,
            block_length=block_length, temperature=temperature, remasking=rng.choice(POLICIES[model_type]),
            threshold=rng.choice([None, None, 0.2, 0.5]), seed=rng.randrange(1000), ignore_eos=rng.random() < 0.5,
            prefix_cache=cache == "prefix", dual_cache=cache == "dual", request_id=f"r{i}"))
    return requests


async def serve(engine: DLMEngine, requests: list[GenerationRequest], arrivals: list[int]):
    """Submit request i once iteration `arrivals[i]` has run (or when the engine would
    go idle first); returns the outputs and every step's stats."""
    loop = asyncio.get_running_loop()
    results = [loop.create_future() for _ in requests]
    steps: list[StepStats] = []
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])

    async def consume(i: int, stream) -> None:
        results[i].set_result([event async for event in stream])

    def release(upto: int) -> None:
        while pending and (arrivals[pending[0]] <= upto or engine.num_running + engine.num_waiting == 0):
            i = pending.pop(0)
            loop.create_task(consume(i, engine.submit(requests[i])))

    def on_step(stats: StepStats) -> None:
        steps.append(stats)
        release(stats.iteration + 1)

    engine.step_listeners.append(on_step)
    release(0)
    events = await asyncio.wait_for(asyncio.gather(*results), timeout=60)
    await engine.shutdown()
    return events, steps


def final(events) -> RequestOutput:
    assert events[-1].type == FINISHED
    return events[-1].output


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_output_equals_generate_alone(model_type, temperature):
    """Mixed lengths, steps, blocks, policies, thresholds, prefix and dual caching, arriving
    at random steps: every output equals generate() on that request alone."""
    model = random_model(model_type)
    rng = random.Random(7 if temperature else 3)
    requests = random_requests(model_type, 14, temperature, rng)
    arrivals = sorted(rng.randrange(0, 15) for _ in requests)
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=4, max_padding_ratio=4.0))
    events, steps = asyncio.run(serve(engine, requests, arrivals))
    for request, request_events in zip(requests, events):
        out = final(request_events)
        assert out.seed == request.seed
        assert out.token_ids == reference(model, request, request.seed), request
        assert out.finish_reason in ("stop", "length")
    # the load really was mixed: several rows per pass, of different lengths, cached beside full
    assert max(s.batch_size for s in steps) == 4
    assert any(0 < s.cached_rows < s.batch_size for s in steps)


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_greedy_rows_at_different_steps_step_as_one_batch(model_type, threshold, monkeypatch):
    """Greedy rows of one kind (policy, threshold, block length) take one batched step whatever step each
    is at, with its own schedule: each output still equals generate() alone."""
    import serve.engine.sequence as sequence_module

    calls: list[tuple[int, object]] = []
    original = sequence_module.denoise_step

    def recording(x, logits, offset, start, end, schedule, step, params, generator):
        calls.append((x.shape[0], step))
        return original(x, logits, offset, start, end, schedule, step, params, generator)

    monkeypatch.setattr(sequence_module, "denoise_step", recording)
    model = random_model(model_type)
    rng = random.Random(11)
    # 8 masks in 3 steps: LLaDA's schedule commits 3, 3, then 2, so a row given another's step would differ
    requests = [GenerationRequest(prompt=[rng.randrange(2, 90) for _ in range(rng.randint(1, 10))], max_tokens=16,
                                  steps=6, block_length=8,
                                  threshold=threshold, dual_cache=i % 2 == 0, ignore_eos=True, seed=i,
                                  request_id=f"g{i}") for i in range(6)]
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=6, max_padding_ratio=16.0))
    events, _ = asyncio.run(serve(engine, requests, [0, 1, 1, 2, 3, 5]))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(model, request, request.seed), request
    assert any(rows > 1 and isinstance(step, list) and len(set(step)) > 1 for rows, step in calls)


def test_padding_ratio_one_still_gives_identical_outputs():
    """Strict bucketing (only equal lengths share a pass) changes the batches, not the outputs."""
    model = random_model("llada")
    requests = random_requests("llada", 6, 0.0, random.Random(11))
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=6, max_padding_ratio=1.0))
    events, steps = asyncio.run(serve(engine, requests, [0] * len(requests)))
    for request, request_events in zip(requests, events):
        assert final(request_events).token_ids == reference(model, request, request.seed)
    assert max(s.batch_size for s in steps) < 6


def test_limits_per_step_are_respected():
    model = random_model("dream")
    config = EngineConfig(max_num_seqs=3, max_tokens_per_step=64, max_padding_ratio=1.5)
    requests = random_requests("dream", 10, 0.0, random.Random(5))
    engine = DLMEngine(model, None, config)
    events, steps = asyncio.run(serve(engine, requests, [0] * len(requests)))
    assert all(final(e).finish_reason in ("stop", "length") for e in events)
    assert steps and all(1 <= s.batch_size <= 3 and s.query_tokens <= 64 for s in steps)
    assert max(s.batch_size for s in steps) > 1


def test_cancellation_frees_the_slot_at_the_next_step():
    model = random_model("llada")
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=1))
    long = GenerationRequest([3, 4], max_tokens=16, steps=16, ignore_eos=True, request_id="long")
    short = GenerationRequest([5], max_tokens=4, steps=4, ignore_eos=True, request_id="short")
    batches: list[list[str]] = []

    def on_step(stats: StepStats) -> None:
        batches.append(stats.request_ids)
        if len(batches) == 3:
            engine.abort("long")

    async def main():
        engine.step_listeners.append(on_step)
        outputs = await asyncio.gather(engine.generate(long), engine.generate(short))
        await engine.shutdown()
        return outputs

    cancelled, done = asyncio.run(main())
    assert batches[:4] == [["long"]] * 3 + [["short"]]
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.forward_passes == 3
    assert done.finish_reason == "length" and done.token_ids == reference(model, short, done.seed)


def test_cancelling_the_consumer_cancels_the_request():
    model = random_model("llada")
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=1))

    async def main():
        task = asyncio.ensure_future(engine.generate(GenerationRequest([3], max_tokens=16, request_id="gone")))
        while engine.scheduler.iteration < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream = engine.submit(GenerationRequest([3], max_tokens=4, ignore_eos=True))
        out = [event async for event in stream][-1].output
        await engine.shutdown()
        return out

    assert asyncio.run(main()).finish_reason == "length"


def test_full_queue_refuses_at_once_then_recovers():
    model = random_model("llada")
    engine = DLMEngine(model, None, EngineConfig(max_num_seqs=1, max_queue=2))

    async def main():
        # one takes the free slot at the next pass, two wait: the fourth is refused
        streams = [engine.submit(GenerationRequest([3], max_tokens=4)) for _ in range(3)]
        with pytest.raises(EngineOverloaded) as refused:
            engine.submit(GenerationRequest([3], max_tokens=4))
        assert refused.value.retry_after >= 1 and refused.value.waiting == 3
        for stream in streams:
            assert [event async for event in stream][-1].output.finish_reason in ("stop", "length")
        again = await engine.generate(GenerationRequest([3], max_tokens=4))
        await engine.shutdown()
        return again

    assert asyncio.run(main()).finish_reason in ("stop", "length")


@pytest.mark.parametrize("cache, cached_passes", [("prefix_cache", [16, 12, 8, 4]), ("dual_cache", [4, 4, 4, 4])])
def test_streamed_events_add_up_to_the_final_output(model_type, cache, cached_passes):
    model = random_model(model_type)
    engine = DLMEngine(model, CharTokenizer(), EngineConfig(**{cache: True}))
    request = GenerationRequest("hello", max_tokens=16, steps=8, block_length=4, ignore_eos=True)

    async def main():
        events = [event async for event in engine.submit(request)]
        await engine.shutdown()
        return events

    events = asyncio.run(main())
    out = final(events)
    tokens = [e for e in events if e.type == TOKENS]
    blocks = [e.block for e in events if e.type == BLOCK]
    assert sum((e.token_ids for e in tokens), []) == out.token_ids
    assert "".join(e.text for e in tokens) == out.text == CharTokenizer().decode(out.token_ids)
    assert blocks == [0, 1, 2, 3]
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert out.first_block_time == next(e.time for e in events if e.type == BLOCK)
    assert 0 < out.time_to_first_token_s <= out.time_to_first_block_s <= out.latency_s
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 16
    assert out.usage.forward_passes == 8
    # only the 4 block-start passes see the whole sequence (21 positions); the others compute the block
    # and what follows (prefix cache) or the block alone (dual cache), one position earlier for Dream's shift
    shift = int(model.shift_logits)
    assert out.usage.computed_tokens == 4 * 21 + sum(n + shift for n in cached_passes)


def test_stop_string_cuts_the_text_and_holds_back_partial_matches():
    model = random_model("llada")
    unstopped = asyncio.run(_one(model, GenerationRequest("abc", max_tokens=16, ignore_eos=True, seed=1)))
    stop = unstopped.text[5:7]
    events = asyncio.run(_events(model, GenerationRequest("abc", max_tokens=16, ignore_eos=True, seed=1, stop=[stop])))
    out = final(events)
    assert out.finish_reason == "stop"
    assert out.text == unstopped.text[:unstopped.text.find(stop)]
    assert "".join(e.text for e in events if e.type == TOKENS) == out.text


async def _events(model, request, config: EngineConfig | None = None):
    engine = DLMEngine(model, CharTokenizer(), config)
    events = [event async for event in engine.submit(request)]
    await engine.shutdown()
    return events


async def _one(model, request, config: EngineConfig | None = None):
    return final(await _events(model, request, config))


def test_every_eos_id_of_the_config_ends_the_completion():
    model = random_model("llada")
    request = GenerationRequest([5, 6, 7], max_tokens=16, block_length=4, seed=2)
    plain = asyncio.run(_one(model, request)).token_ids
    second_eos = plain[6]
    model.config = replace(model.config, eos_token_ids=(EOS_ID, second_eos))
    out = asyncio.run(_one(model, request))
    assert out.finish_reason == "stop" and out.token_ids == plain[:plain.index(second_eos)]


def test_messages_render_through_the_chat_template():
    from benchmarks.bench_engine import random_tiny_model
    from sinkprune.dlm.loading import embedded_model_dir, load_tokenizer
    from sinkprune.dlm.prompt import encode_chat
    from tests.e2e import PLAIN_CHAT_TEMPLATE

    model, tokenizer = random_tiny_model("cpu", torch.float32), load_tokenizer(embedded_model_dir())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a file."}]

    async def run(request, tok):
        engine = DLMEngine(model, tok)
        try:
            return final([event async for event in engine.submit(request)])
        finally:
            await engine.shutdown()

    with pytest.raises(RequestError, match="no chat template") as refused:
        asyncio.run(run(GenerationRequest(messages=messages, max_tokens=4), tokenizer))
    assert refused.value.field == "messages"
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    ids = encode_chat(tokenizer, messages, model.config)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system: Be brief.\nuser: Name a file.\nassistant:"
    assert ids[0] == model.config.bos_token_id  # LLaDA sequences start with BOS
    chat = asyncio.run(run(GenerationRequest(messages=messages, max_tokens=8, seed=3), tokenizer))
    plain = asyncio.run(run(GenerationRequest(ids, max_tokens=8, seed=3), tokenizer))
    assert chat.token_ids == plain.token_ids and chat.usage.prompt_tokens == len(ids)
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}]):
        with pytest.raises(RequestError, match="messages"):
            asyncio.run(run(GenerationRequest(messages=bad), tokenizer))
    with pytest.raises(RequestError, match="either a prompt or messages"):
        asyncio.run(run(GenerationRequest("x", messages=messages), tokenizer))


def test_stop_token_ids_end_the_completion_even_with_ignore_eos():
    model = random_model("llada")
    request = GenerationRequest([5, 6, 7], max_tokens=16, block_length=4, ignore_eos=True, seed=2)
    unstopped = asyncio.run(_one(model, request)).token_ids
    stop = unstopped[6]  # a token this model writes mid-answer (its first occurrence may be earlier)
    expected = unstopped[:unstopped.index(stop)]
    out = asyncio.run(_one(model, replace(request, stop_token_ids=[stop, 93])))
    assert out.finish_reason == "stop" and out.token_ids == expected
    # the same as an engine-wide default, which a request's own list (here empty) overrides
    assert asyncio.run(_one(model, request, EngineConfig(stop_token_ids=[stop]))).token_ids == expected
    assert asyncio.run(_one(model, replace(request, stop_token_ids=[]),
                            EngineConfig(stop_token_ids=[stop]))).token_ids == unstopped


def test_eos_finishes_early_with_the_tokens_before_it():
    model = random_model("llada")
    for first in range(2, 90):  # a prompt for which this random model emits EOS mid-answer
        full = reference(model, GenerationRequest([first, 4], max_tokens=16, block_length=4, ignore_eos=True,
                                                  remasking="low_confidence"), 0)
        if EOS_ID in full[:8]:
            break
    else:
        raise AssertionError("no prompt makes this model emit EOS")
    out = asyncio.run(_one(model, GenerationRequest([first, 4], max_tokens=16, block_length=4, seed=0)))
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(EOS_ID)]
    assert out.usage.forward_passes < 16


def test_incremental_text_holds_back_stop_prefixes_and_partial_characters():
    class Plain:
        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            return "".join(ids)

    text = IncrementalText(Plain(), ("END",))
    assert text.update(["ab", "E"], final=False) == ("ab", False)
    assert text.update(["ab", "E", "N"], final=False) == ("", False)
    assert text.update(["ab", "E", "N", "x"], final=False) == ("ENx", False)
    assert text.update(["ab", "E", "N", "x", "\ufffd"], final=False) == ("", False)
    assert text.update(["ab", "E", "N", "x", "EN", "D!"], final=False) == ("", True)
    assert text.text == "abENx"
    assert IncrementalText(Plain(), ("END",)).update(["abEN"], final=True) == ("abEN", False)


@pytest.mark.parametrize("field, change", [
    ("prompt", {"prompt": []}), ("prompt", {"prompt": [3, 999]}), ("prompt", {"prompt": "text needs a tokenizer"}),
    ("max_tokens", {"max_tokens": 0}), ("max_tokens", {"max_tokens": 10_000}),
    ("block_length", {"max_tokens": 8, "block_length": 3}), ("steps", {"max_tokens": 8, "block_length": 4, "steps": 3}),
    ("steps", {"max_tokens": 8, "steps": 9}), ("temperature", {"temperature": -1.0}),
    ("temperature", {"temperature": float("nan")}), ("remasking", {"remasking": "bogus"}),
    ("threshold", {"threshold": 0.0}), ("seed", {"seed": -1}), ("stop", {"stop": [""]}),
    ("prefix_cache", {"prefix_cache": "yes"}), ("dual_cache", {"dual_cache": 1}), ("max_tokens", {"max_tokens": True}),
    ("stop_token_ids", {"stop_token_ids": [-1]}), ("stop_token_ids", {"stop_token_ids": [96]}),
    ("stop_token_ids", {"stop_token_ids": 5}), ("stop_token_ids", {"stop_token_ids": list(range(9))}),
])
def test_invalid_requests_name_the_field(field, change):
    engine = DLMEngine(random_model("llada"), None, EngineConfig(max_tokens_per_step=512))

    async def main():
        try:
            with pytest.raises(RequestError) as err:
                engine.submit(GenerationRequest(**({"prompt": [3]} | change)))
        finally:
            await engine.shutdown()
        return err.value

    error = asyncio.run(main())
    assert error.field == field and isinstance(error, ValueError) and str(error).startswith(field)


def test_duplicate_request_id_is_refused():
    engine = DLMEngine(random_model("llada"))

    async def main():
        engine.submit(GenerationRequest([3], request_id="same"))
        with pytest.raises(RequestError, match="request_id"):
            engine.submit(GenerationRequest([3], request_id="same"))
        await engine.shutdown()

    asyncio.run(main())


def test_a_failing_pass_fails_its_requests_not_the_engine():
    model = random_model("llada")
    engine = DLMEngine(model, None)
    original = engine.runner.step
    calls = {"n": 0}

    def flaky(batch, moves=()):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return original(batch, moves)

    engine.runner.step = flaky

    async def main():
        with pytest.raises(EngineError, match="out of memory"):
            await engine.generate(GenerationRequest([3], max_tokens=4))
        out = await engine.generate(GenerationRequest([3], max_tokens=4, ignore_eos=True))
        await engine.shutdown()
        return out

    assert asyncio.run(main()).finish_reason == "length"


def test_submit_outside_an_event_loop_or_after_shutdown_is_a_clear_error():
    engine = DLMEngine(random_model("llada"))
    with pytest.raises(RuntimeError, match="no running event loop"):
        engine.submit(GenerationRequest([3]))

    async def main():
        await engine.generate(GenerationRequest([3], max_tokens=2))
        await engine.shutdown()
        with pytest.raises(EngineError, match="shut down"):
            engine.submit(GenerationRequest([3]))

    asyncio.run(main())


def test_a_dead_loop_fails_pending_requests_and_reports_unhealthy():
    engine = DLMEngine(random_model("llada"))

    def broken(now):
        raise RuntimeError("scheduler bug")

    async def main():
        await engine.generate(GenerationRequest([3], max_tokens=2))
        engine.check_health()
        engine.scheduler.schedule = broken
        with pytest.raises(EngineError, match="scheduler bug"):
            await engine.generate(GenerationRequest([3], max_tokens=2))
        with pytest.raises(EngineError, match="engine loop died"):
            engine.check_health()

    asyncio.run(main())
