"""engine.engine: KV-cache equivalence, seeded sampling, continuous batching and tool use."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import engine.engine as engine_module
from engine.engine import (
    FINISHED,
    Batch,
    Engine,
    FinishReason,
    SamplingParams,
    resolve_device,
    row_buckets,
    row_seed,
    sample_tokens,
)
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Calculator practice: 2+3*4 is 14, 12*34 is 408, and 100/4 is 25.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "안녕하세요, 세계! 오늘 날씨가 좋네요. 😀🎉🚀",
    "How many r are in strawberry? Let me count the letters one by one.",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second
    thread waiting at OpenMP barriers makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS * 20, vocab_size=320)


def make_model(vocab_size, seed=0, **overrides):
    """A small GPT whose weights are all non-trivial (at init the zero projections would make
    every block the identity and the logits nearly flat, hiding cache bugs behind ties)."""
    fields = dict(
        sequence_len=96,
        vocab_size=vocab_size,
        n_layer=3,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        window_pattern="SSL",
        # S windows of half the context (48), so they bind within the tested lengths; at this
        # context nanochat's rule (a quarter rounded up to 128) would never bind.
        short_window_divisor=2,
        short_window_multiple=1,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**fields))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size)


def run_alone(model, tokenizer, prompt, params):
    batch = Batch(model, tokenizer, max_rows=1)
    row = batch.add(prompt, params)
    while batch.rows:
        batch.step()
    return row


PROMPT = [5, 17, 99, 3, 250, 41]


# ---- KV-cache equivalence ---------------------------------------------------------------------


def test_sliding_window_changes_the_logits_within_the_tested_length(model):
    # Guards the next test: the S layers (window 48 of a 96 context) must bind at 76 positions.
    full_context = GPT(GPTConfig(**{**model.config.to_dict(), "window_pattern": "L"})).eval()
    full_context.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 76), generator=torch.Generator())
    with torch.no_grad():
        windowed, unwindowed = model(ids), full_context(ids)
    assert torch.allclose(windowed[:, :48], unwindowed[:, :48], atol=1e-5)
    assert not torch.allclose(windowed[:, 60:], unwindowed[:, 60:], atol=1e-3)


def test_greedy_cached_decoding_equals_full_reforward_with_gqa_and_windows(model):
    assert model.config.n_kv_head < model.config.n_head
    expected = list(model.generate_naive(PROMPT, 70, temperature=0.0))
    columns = list(Engine(model, None).generate(PROMPT, max_tokens=70, temperature=0.0))
    assert [column[0] for column, _ in columns] == expected
    assert all(masks == [1] for _, masks in columns)


def test_all_samples_of_a_greedy_request_equal_the_full_reforward(model):
    expected = list(model.generate_naive(PROMPT, 40, temperature=0.0))
    sequences, masks = Engine(model, None).generate_batch(
        PROMPT, num_samples=3, max_tokens=40, temperature=0.0
    )
    for sequence, mask in zip(sequences, masks, strict=True):
        assert sequence == PROMPT + expected
        assert mask == [0] * len(PROMPT) + [1] * 40


def test_a_one_token_prompt_needs_no_prefill(model):
    expected = list(model.generate_naive([7], 20, temperature=0.0))
    sequences, _ = Engine(model, None).generate_batch([7], max_tokens=20, temperature=0.0)
    assert sequences[0] == [7, *expected]


def test_cache_is_allocated_once(model):
    batch = Batch(model, None, max_rows=2, max_len=64)
    pointers = (batch.cache.k.data_ptr(), batch.cache.v.data_ptr())
    batch.add(PROMPT, SamplingParams(max_tokens=30))
    batch.add(PROMPT[:2], SamplingParams(max_tokens=20))
    while batch.rows:
        batch.step()
    assert (batch.cache.k.data_ptr(), batch.cache.v.data_ptr()) == pointers


# ---- limits ---------------------------------------------------------------------------------


def test_max_tokens_and_num_samples_are_respected(model):
    sequences, masks = Engine(model, None).generate_batch(
        PROMPT, num_samples=5, max_tokens=9, temperature=1.0
    )
    assert len(sequences) == len(masks) == 5
    assert all(
        len(s) == len(PROMPT) + 9 and len(m) == len(s)
        for s, m in zip(sequences, masks, strict=True)
    )


def test_max_tokens_is_clamped_to_the_context(model):
    context = model.config.sequence_len
    prompt = list(range(1, 91))
    # The prompt's last token and every generated one but the last need a cache position.
    for max_tokens in (None, 1000):
        sequences, _ = Engine(model, None).generate_batch(prompt, max_tokens=max_tokens)
        assert len(sequences[0]) - len(prompt) == context - (len(prompt) - 1)


def test_prompt_longer_than_the_context_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        Engine(model, None).generate(list(range(1, 98)))


def test_prompt_longer_than_the_cache_is_rejected(model):
    batch = Batch(model, None, max_rows=1, max_len=10)
    with pytest.raises(ValueError, match="does not fit the KV cache of 10"):
        batch.add(list(range(1, 13)))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "at least one token"), ([1, 2, 10_000], "not a token id"), ([1, -1], "not a token id")],
)
def test_bad_prompts_are_rejected(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        Batch(model, None).add(prompt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_full_batch_refuses_more_rows(model):
    batch = Batch(model, None, max_rows=2)
    batch.add_samples(PROMPT, None, 2)
    with pytest.raises(ValueError, match="0 free rows of 2"):
        batch.add(PROMPT)


# ---- seeds and sampling ---------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output(model):
    engine = Engine(model, None)

    def sample(seed):
        return engine.generate_batch(PROMPT, num_samples=2, max_tokens=30, seed=seed)[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_samples_of_one_prompt_differ(model):
    sequences, _ = Engine(model, None).generate_batch(
        PROMPT, num_samples=16, max_tokens=12, temperature=1.0, top_k=50
    )
    assert len({tuple(s) for s in sequences}) > 1


def test_row_seeds_are_unrelated_for_neighbouring_requests():
    seeds = {row_seed(seed, index) for seed in range(20) for index in range(20)}
    assert len(seeds) == 400


def test_sample_tokens_follows_the_softmax_distribution():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    n = 4000
    uniforms = [(i + 0.5) / n for i in range(n)]
    for temperature in (0.5, 1.0, 2.0):
        tokens = sample_tokens(logits.expand(n, -1), [temperature] * n, [None] * n, uniforms)
        counts = torch.bincount(torch.tensor(tokens), minlength=5).float() / n
        expected = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(counts, expected, atol=2 / n)


def test_sample_tokens_gives_each_row_its_own_top_k_and_temperature():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    n = 3000
    uniforms = [(i + 0.5) / n for i in range(n)]
    # Rows alternate between four settings within one batch.
    settings = [(0.0, None), (1.0, 2), (0.7, 3), (1.0, None)]
    temperatures = [settings[i % 4][0] for i in range(4 * n)]
    top_ks = [settings[i % 4][1] for i in range(4 * n)]
    row_uniforms = [uniforms[i // 4] for i in range(4 * n)]
    tokens = sample_tokens(logits.expand(4 * n, -1), temperatures, top_ks, row_uniforms)
    for offset, (temperature, top_k) in enumerate(settings):
        counts = torch.bincount(torch.tensor(tokens[offset::4]), minlength=5).float() / n
        if temperature == 0:
            expected = torch.nn.functional.one_hot(logits.argmax(), 5).float()
        else:
            kept = logits.clone()
            if top_k is not None:
                kept[logits < logits.topk(top_k).values[-1]] = -math.inf
            expected = torch.softmax(kept / temperature, dim=-1)
        assert torch.allclose(counts, expected, atol=2 / n), (temperature, top_k)


# ---- log-probabilities ------------------------------------------------------------------------


def full_log_softmax(model, tokens):
    """(len(tokens), vocab) log-probabilities of each next token, from one uncached forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_logprobs_are_the_models_log_softmax_for_the_rows_that_ask(model, static):
    batch = Batch(model, None, max_rows=4, static_shapes=static)
    # Sampled with temperature and top-k, reported from the raw distribution.
    asking = batch.add_samples(
        PROMPT, SamplingParams(max_tokens=12, temperature=0.7, top_k=5, seed=3, logprobs=3), 2
    )
    plain = batch.add([1, 2, 3], SamplingParams(max_tokens=12, temperature=0.0))
    while batch.rows:
        batch.step()
    assert plain.logprobs == []
    for row in asking:
        expected = full_log_softmax(model, row.tokens[:-1])[len(PROMPT) - 1 :]
        assert len(row.logprobs) == len(row.output_tokens) == 12
        for entry, token, dist in zip(row.logprobs, row.output_tokens, expected, strict=True):
            assert entry.logprob == pytest.approx(dist[token].item(), abs=1e-4)
            values, ids = dist.topk(3)
            assert [i for i, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_are_bounded():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


# ---- continuous batching --------------------------------------------------------------------


def test_rows_joining_and_leaving_produce_what_each_would_alone(model, tokenizer):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    sampled = SamplingParams(max_tokens=30, temperature=0.9, top_k=40, seed=5)
    long_greedy = SamplingParams(max_tokens=25, temperature=0.0)
    other = SamplingParams(max_tokens=40, temperature=1.0, seed=9)
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [42], [60, 61, 62]]
    batch = Batch(model, tokenizer, max_rows=4)
    a = batch.add(prompts[0], greedy)
    for _ in range(3):
        batch.step()
    b = batch.add(prompts[1], sampled)
    c = batch.add(prompts[2], long_greedy)
    batch.step()
    d = batch.add(prompts[3], other)
    steps = 0
    while batch.rows:
        batch.step()
        steps += 1
        if steps == 5:
            batch.cancel(d)  # leaves from the middle while the others go on
    assert d.finish_reason == FinishReason.CANCELLED
    for row, prompt, params in ((a, prompts[0], greedy), (b, prompts[1], sampled)):
        assert row.output_tokens == run_alone(model, tokenizer, prompt, params).output_tokens
    assert c.output_tokens == run_alone(model, tokenizer, prompts[2], long_greedy).output_tokens
    alone_d = run_alone(model, tokenizer, prompts[3], other).output_tokens
    assert d.output_tokens == alone_d[: len(d.output_tokens)]


def test_step_reports_every_active_row_and_finished_rows_free_their_slot(model):
    batch = Batch(model, None, max_rows=3)
    short = batch.add(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))
    long = batch.add([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    first = batch.step()
    assert [(row, mask) for row, _, mask in first] == [(short, 1), (long, 1)]
    batch.step()
    assert short.done and short.finish_reason == FinishReason.LENGTH
    assert batch.rows == [long] and batch.free_rows == 2
    while batch.rows:
        batch.step()
    assert long.num_generated == 4 and long.finish_reason == FinishReason.LENGTH


# ---- stop tokens and tools ------------------------------------------------------------------


def special(tokenizer, name):
    return tokenizer.encode_special(name)


@pytest.mark.parametrize("name", ["<|assistant_end|>", "<|bos|>"])
def test_rows_stop_at_assistant_end_and_bos(model, tokenizer, name):
    batch = Batch(model, tokenizer, max_rows=2)
    row = batch.add(PROMPT, SamplingParams(max_tokens=50, temperature=0.0))
    batch.force(row, [11, special(tokenizer, name)])
    events = batch.step() + batch.step()
    assert [(token, mask) for _, token, mask in events] == [
        (11, 0),
        (special(tokenizer, name), 0),
    ]
    assert row.done and row.finish_reason == FinishReason.STOP and not batch.rows


def test_generate_stops_a_sample_and_pads_its_column(model, tokenizer):
    engine = Engine(model, tokenizer)
    stop = {special(tokenizer, "<|assistant_end|>"), special(tokenizer, "<|bos|>")}
    columns = list(engine.generate(PROMPT, num_samples=8, max_tokens=60, temperature=1.5))
    stopped = 0
    for i in range(8):
        tokens = [column[i] for column, _ in columns]
        masks = [mask_column[i] for _, mask_column in columns]
        end = tokens.index(FINISHED) if FINISHED in tokens else len(tokens)
        # Nothing after a stop token but padding, and no stop token before the last one.
        assert not stop & set(tokens[: end - 1])
        if end < len(tokens):
            assert tokens[end - 1] in stop
            assert set(tokens[end:]) == {FINISHED} and set(masks[end:]) == {0}
            stopped += 1
    assert stopped > 0  # the seed makes some samples stop early, so the padding is exercised
    assert len(columns) <= 60


def run_tool_call(model, tokenizer, expression):
    """Force a python call into a row and return the events after <|python_end|>."""
    batch = Batch(model, tokenizer, max_rows=1)
    row = batch.add(tokenizer.encode("Compute it."), SamplingParams(max_tokens=40, temperature=0))
    call = [
        special(tokenizer, "<|python_start|>"),
        *tokenizer.encode(expression),
        special(tokenizer, "<|python_end|>"),
    ]
    batch.force(row, call)
    emitted = [batch.step()[0] for _ in call]
    assert [token for _, token, _ in emitted] == call
    events = []
    while batch.rows:
        events.extend((token, mask) for _, token, mask in batch.step())
    return row, events


def test_a_python_call_is_answered_with_forced_output_tokens(model, tokenizer):
    row, events = run_tool_call(model, tokenizer, " 2+3*4 ")
    answer = [
        special(tokenizer, "<|output_start|>"),
        *tokenizer.encode("14"),
        special(tokenizer, "<|output_end|>"),
    ]
    assert events[: len(answer)] == [(token, 0) for token in answer]
    assert events[len(answer)][1] == 1
    # The forced tokens were fed to the model: the next greedy token is what a full forward
    # of the whole sequence predicts.
    position = len(row.tokens) - len(events) + len(answer)
    with torch.no_grad():
        logits = model(torch.tensor([row.tokens[:position]]))
    assert events[len(answer)][0] == int(logits[0, -1].argmax())


def test_an_unsafe_python_call_gets_no_output(model, tokenizer):
    _, events = run_tool_call(model, tokenizer, "__import__('os').getcwd()")
    assert events[0][1] == 1


def test_forcing_into_a_finished_row_is_rejected(model, tokenizer):
    batch = Batch(model, tokenizer, max_rows=1)
    row = batch.add(PROMPT, SamplingParams(max_tokens=1))
    batch.step()
    with pytest.raises(ValueError, match="not active"):
        batch.force(row, [1])


# ---- host <-> device traffic of a decode step ---------------------------------------------

# Tensor methods that read a value back to the host (on a GPU: wait for the device).
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}


class HostTraffic(TorchFunctionMode):
    """Records every host read and every tensor made from host data (an upload on a GPU).

    Reads of a row's uniform block are left out: those tensors come from the row's own CPU
    generator (`torch.rand(..., generator=)`) and live on the host whatever the device.
    """

    def __init__(self):
        super().__init__()
        self.reads = []
        self.uploads = 0
        self._host_draws = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "rand" and kwargs.get("generator") is not None:
            self._host_draws.append(out)
        elif name in HOST_READS and not any(args[0] is t for t in self._host_draws):
            self.reads.append(name)
        elif name in ("tensor", "as_tensor") or (name in ("to", "cuda") and out is not args[0]):
            # (`.to` of a tensor already in place returns it: no copy, e.g. attention's masks.)
            self.uploads += 1
        return out


@pytest.fixture
def counted_uploads(monkeypatch):
    """How many times the engine's one upload helper was called."""
    calls = []
    original = engine_module._upload

    def upload(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_upload", upload)
    return calls


def traffic_of_steps(batch, steps, upload_calls=None):
    batch.step()  # the first step builds the derived weights and sampling settings
    if upload_calls is not None:
        upload_calls.clear()
    with HostTraffic() as traffic:
        for _ in range(steps):
            batch.step()
    return traffic


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_greedy_step_reads_the_device_once_and_uploads_nothing(model, static):
    batch = Batch(model, None, max_rows=4, static_shapes=static)
    for prompt in (PROMPT, [1, 2, 3], [9]):  # three different lengths: the masked path
        batch.add(prompt, SamplingParams(max_tokens=40, temperature=0.0))
    traffic = traffic_of_steps(batch, 10)
    assert traffic.reads == ["tolist"] * 10
    assert traffic.uploads == 0


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_sampling_step_reads_once_and_uploads_only_its_uniforms(model, static, counted_uploads):
    batch = Batch(model, None, max_rows=4, static_shapes=static)
    batch.add(PROMPT, SamplingParams(max_tokens=40, temperature=0.8, top_k=20, seed=1))
    batch.add([1, 2, 3], SamplingParams(max_tokens=40, temperature=0.0))
    batch.add([9, 4], SamplingParams(max_tokens=40, temperature=1.3, seed=2))
    traffic = traffic_of_steps(batch, 10, counted_uploads)
    assert traffic.reads == ["tolist"] * 10
    # One upload per step (the uniforms), and only through `_upload`, which copies
    # asynchronously from pinned memory on CUDA.
    assert traffic.uploads == 10
    assert len(counted_uploads) == 10


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_forced_tokens_are_uploaded_through_the_async_path(
    model, tokenizer, static, counted_uploads
):
    batch = Batch(model, tokenizer, max_rows=2, static_shapes=static)
    row = batch.add(PROMPT, SamplingParams(max_tokens=20, temperature=0.0))
    batch.step()
    batch.force(row, [7, 8])
    counted_uploads.clear()
    with HostTraffic() as traffic:
        events = [batch.step()[0] for _ in range(4)]
    assert [(token, mask) for _, token, mask in events[:2]] == [(7, 0), (8, 0)]
    assert traffic.reads == ["tolist"] * 4
    # The step after a forced token feeds it from the host: one upload, then none.
    assert traffic.uploads == 2
    if not static:  # (the static step writes into its input buffer with `_upload_into`)
        assert len(counted_uploads) == 2


# ---- the static decode step --------------------------------------------------------------


def test_row_buckets_are_powers_of_two_then_max_rows():
    assert row_buckets(1) == [1]
    assert row_buckets(5) == [1, 2, 4, 5]
    assert row_buckets(8) == [1, 2, 4, 8]


class OpTrace(TorchFunctionMode):
    """(op, output shape) of every tensor-valued torch call."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.ops.append((getattr(func, "__name__", str(func)), tuple(out.shape)))
        return out


@pytest.mark.parametrize("static", [True, False], ids=["static", "eager"])
def test_the_static_step_repeats_the_same_ops_on_the_same_shapes(model, static):
    """What a CUDA graph replays: every step of a bucket, whatever the rows' lengths, must
    launch the same ops on the same shapes (eager decoding, which slices the cache to the
    longest row, is the counter-example)."""
    batch = Batch(model, None, max_rows=4, static_shapes=static)
    for prompt in (PROMPT, [1, 2, 3], [9]):
        batch.add(prompt, SamplingParams(max_tokens=40, temperature=0.0))
    batch.step()
    traces = []
    for _ in range(3):
        with OpTrace() as trace:
            batch.step()
        traces.append(trace.ops)
    assert (traces[0] == traces[1] == traces[2]) is static


def test_static_greedy_decoding_equals_full_reforward_with_windows(model):
    expected = list(model.generate_naive(PROMPT, 70, temperature=0.0))
    batch = Batch(model, None, max_rows=3, static_shapes=True)
    rows = [batch.add(PROMPT, SamplingParams(max_tokens=70, temperature=0.0)) for _ in range(3)]
    while batch.rows:
        batch.step()
    assert all(row.output_tokens == expected for row in rows)


def churn(model, tokenizer, **options):
    """Rows joining, leaving and cancelled mid-way, in buckets of 1, 2, 4 and 5 rows."""
    batch = Batch(model, tokenizer, max_rows=5, **options)
    plans = [
        (PROMPT, SamplingParams(max_tokens=12, temperature=0.0)),
        (
            [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12],
            SamplingParams(max_tokens=30, temperature=0.9, top_k=40, seed=5),
        ),  # fmt: skip
        ([42], SamplingParams(max_tokens=25, temperature=0.0)),
        ([60, 61, 62], SamplingParams(max_tokens=40, temperature=1.0, seed=9)),
        ([3, 1, 4, 1, 5], SamplingParams(max_tokens=33, temperature=0.7, seed=3)),
    ]
    rows = [batch.add(*plans[0])]
    for _ in range(3):
        batch.step()
    rows += [batch.add(*plans[1]), batch.add(*plans[2])]
    batch.step()
    rows += [batch.add(*plans[3]), batch.add(*plans[4])]
    steps = 0
    while batch.rows:
        batch.step()
        steps += 1
        if steps == 5:
            batch.cancel(rows[3])
        if steps == 20:
            rows.append(batch.add(*plans[0]))  # joins a slot another row left
    return [(row.output_tokens, row.masks, row.finish_reason) for row in rows]


def test_static_shapes_give_the_tokens_of_eager_decoding(model, tokenizer):
    assert churn(model, tokenizer, static_shapes=True) == churn(model, tokenizer)


def test_a_static_engine_reuses_its_batch_and_drops_an_abandoned_generation(model):
    engine = Engine(model, None, static_shapes=True)
    expected = list(model.generate_naive(PROMPT, 20, temperature=0.0))
    abandoned = engine.generate(PROMPT, num_samples=2, max_tokens=50, temperature=0.0)
    next(abandoned)
    next(abandoned)
    for _ in range(2):
        sequences, _ = engine.generate_batch(PROMPT, 2, 20, temperature=0.0)
        assert sequences == [PROMPT + expected] * 2
    assert list(engine._batches) == [2]
    assert engine._batches[2].max_len == model.config.sequence_len


def test_cuda_graphs_need_a_cuda_device(model):
    if model.get_device().type == "cuda":
        pytest.skip("the model is on CUDA")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Batch(model, None, cuda_graphs=True)


def leading_agreement(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_gives_the_tokens_of_eager_decoding(tokenizer):
    """In bf16 the graph's step (whole cache, masked) and eager's (sliced) may round apart, so
    rows must agree for their first 10 tokens (a near-tie can flip one after that)."""
    cuda_model = make_model(tokenizer.vocab_size).to("cuda")
    eager = churn(cuda_model, tokenizer)
    graphs = churn(cuda_model, tokenizer, cuda_graphs=True)
    for (tokens, _, _), (graph_tokens, _, _) in zip(eager, graphs, strict=True):
        assert leading_agreement(tokens, graph_tokens) >= min(len(tokens), 10)
    engine = Engine(cuda_model, None, cuda_graphs=True)
    expected, _ = Engine(cuda_model, None).generate_batch(PROMPT, 2, 30, temperature=0.0)
    for _ in range(2):  # the second call replays the graphs the first one captured
        sequences, _ = engine.generate_batch(PROMPT, 2, 30, temperature=0.0)
        assert all(
            leading_agreement(s, e) >= len(PROMPT) + 10
            for s, e in zip(sequences, expected, strict=True)
        )
    assert engine._batches[2]._static._graphs


# ---- choosing a device ---------------------------------------------------------------------


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device_pins_cuda_n_within_the_visible_devices(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(ValueError) as error:
        resolve_device("cuda:2", flag="--device")
    message = str(error.value)
    assert message.startswith("--device cuda:2:")
    assert "sees 2 CUDA device(s) (CUDA_VISIBLE_DEVICES=6,7), cuda:0 to cuda:1" in message


def test_resolve_device_names_the_flag_when_cuda_is_absent(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"^--engine-device cuda:0: CUDA is not available"):
        resolve_device("cuda:0", flag="--engine-device")
    assert resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "xla", "cuda:-1"])
def test_resolve_device_rejects_what_is_not_a_device(spec):
    with pytest.raises(ValueError, match=f"^--device {spec!r}|^--device {spec}"):
        resolve_device(spec)
