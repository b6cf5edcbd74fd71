"""The builtin engine: logprobs equal a fresh forward pass, greedy equals an uncached loop, stops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orbit_core.models import load_model, load_tokenizer
from orbit_core.peft import apply_lora
from orbit_core.rl.logprobs import token_logprobs
from orbit_core.rollout import BuiltinEngine, SamplingParams
from orbit_core.rollout.sampling import sample_tokens


def _engine(path, max_running=4, lora=True):
    model, tok = load_model(path), load_tokenizer(path)
    if lora:
        apply_lora(model, 4, 8, 0.0, ["all-linear"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return BuiltinEngine(model, tok, max_running=max_running, seed=3), model, tok


def _prompts(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in ("1+2=", "34-12=", "7=", "99+99+1-5=", "5-")]


def test_logprobs_equal_fresh_forward(tiny_checkpoint):
    # more requests (5 prompts x 3) than slots (4): exercises slot reuse and mixed prompt lengths
    engine, model, tok = _engine(tiny_checkpoint, max_running=4)
    for temperature in (1.0, 0.7):
        completions = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=10, temperature=temperature, n=3))
        assert len(completions) == 15
        assert [(c.prompt_index, c.sample_index) for c in completions] == [(p, s) for p in range(5) for s in range(3)]
        for c in completions:
            ids = torch.tensor([c.prompt_ids + c.token_ids])
            with torch.no_grad():
                logits = model(ids[:, :-1])
            expected = token_logprobs(logits, ids[:, 1:], temperature)[0, len(c.prompt_ids) - 1 :]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-5, rtol=0)


def test_greedy_matches_uncached_loop(tiny_checkpoint):
    engine, model, tok = _engine(tiny_checkpoint, max_running=2)
    prompts = _prompts(tok)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    eos = tok.eos_token_id
    for prompt, c in zip(prompts, completions):
        ids = list(prompt)
        generated = []
        for _ in range(8):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            generated.append(nxt)
            ids.append(nxt)
            if nxt == eos:
                break
        assert c.token_ids == generated
        assert c.finish_reason == ("eos" if generated[-1] == eos else "length")


def test_top_k_one_is_greedy(tiny_checkpoint):
    engine, _, tok = _engine(tiny_checkpoint)
    greedy = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=6, temperature=0.0))
    top1 = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]


def test_stop_strings_cut_the_text(tiny_checkpoint):
    engine, _, tok = _engine(tiny_checkpoint)
    plain = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=12, temperature=1.0, n=4))
    stop_char = max("0123456789", key=lambda ch: sum(ch in c.text for c in plain))
    stopped = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=12, temperature=1.0, n=4, stop=(stop_char,)))
    hits = [c for c in stopped if c.finish_reason == "stop"]
    assert hits, "the stop string never appeared"
    for c in hits:
        assert stop_char not in c.text
        assert stop_char in tok.decode(c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)


def test_an_empty_prompt_is_refused_before_any_work(tiny_checkpoint):
    engine, _, tok = _engine(tiny_checkpoint, lora=False)
    with pytest.raises(ValueError, match="a prompt with no tokens"):
        engine.generate([_prompts(tok)[0], []], SamplingParams(max_new_tokens=4))
    assert len(engine.generate(_prompts(tok)[:1], SamplingParams(max_new_tokens=4))) == 1  # and the engine goes on


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, _ = sample_tokens(logits, 1.0, top_k=2, generator=gen)
    assert set(tokens.tolist()) == {2, 3}
    probs = torch.softmax(logits[0], -1)  # [0.032, 0.087, 0.237, 0.644]
    tokens, logprobs = sample_tokens(logits, 1.0, top_p=0.7, generator=gen)
    assert set(tokens.tolist()) == {2, 3}  # 0.644 < 0.7, so the second token is needed
    # the recorded logprob is of the distribution sampled from: renormalized over the kept tokens
    kept = probs[2:] / probs[2:].sum()
    torch.testing.assert_close(logprobs[tokens == 3][0], kept[1].log())
    torch.testing.assert_close(logprobs[tokens == 2][0], kept[0].log())
    assert abs((tokens == 3).float().mean().item() - kept[1].item()) < 0.04


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_logprobs_equal_fresh_forward(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, device="cuda"), load_tokenizer(tiny_checkpoint)
    apply_lora(model, 4, 8, 0.0, ["all-linear"])
    model.to("cuda")
    engine = BuiltinEngine(model, tok, max_running=4, seed=0)
    for _ in range(2):  # the second time, prefill shapes seen before replay captured graphs
        completions = engine.generate(_prompts(tok), SamplingParams(max_new_tokens=10, temperature=1.0, n=3))
        for c in completions:
            ids = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
            with torch.no_grad():
                expected = token_logprobs(model(ids[:, :-1]), ids[:, 1:])[0, len(c.prompt_ids) - 1 :].cpu()
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    assert engine.loop.graphed.prefills and not engine.loop.graphed.prefill_failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("adapter", ["lora", "oft"])
def test_cuda_graph_decode_equals_eager_decode(tiny_checkpoint, temperature, adapter):
    """The trainer's live adapter (no slot bank): for OFT the graph solves the rotation itself."""
    from orbit_core.peft.oft import apply_oft

    model, tok = load_model(tiny_checkpoint, device="cuda"), load_tokenizer(tiny_checkpoint)
    if adapter == "lora":
        apply_lora(model, 4, 8, 0.0, ["all-linear"])
    else:
        apply_oft(model, 8, False, 6e-5, False, ["all-linear"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "oft_skew" in name:
                p.normal_(0.0, 0.05)
    model.to("cuda")
    params = SamplingParams(max_new_tokens=12, temperature=temperature, n=5)
    engines = {graphs: BuiltinEngine(model, tok, max_running=16, seed=3, cuda_graph=graphs) for graphs in (True, False)}
    for engine in engines.values():
        engine.loop.check_every = 4  # as graphs do: rows are then admitted at the same steps
    for update in range(2):  # then again after an in-place update, as an optimizer step makes
        if update:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name or "oft_skew" in name:
                        p.add_(torch.randn_like(p) * 0.05)
        runs = {graphs: engine.generate(_prompts(tok), params) for graphs, engine in engines.items()}
        graphed = engines[True].loop.graphed
        assert graphed is not None and graphed.graphs and not graphed.failed
        assert bool(graphed.prefills) == bool(update)  # a prefill shape is captured when it comes again
        for g, e in zip(runs[True], runs[False]):
            assert g.token_ids == e.token_ids
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)
    # without filters the sampling kernel keys its draws by a device counter: once the cache has
    # drawn its base, no step draws from the generator, so no replay advances it
    offsets = {graphs: engine.generator.get_offset() for graphs, engine in engines.items()}
    assert offsets[True] == offsets[False]
    engines[True].generate(_prompts(tok), params)
    assert engines[True].generator.get_offset() == offsets[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_admits_through_pinned_copies_decode_what_waiting_copies_decode(tiny_checkpoint, monkeypatch):
    """``ASYNC_ADMIT`` sends prompts and rows without waiting for the steps queued before them:
    with admits arriving while other rows decode (15 requests through 4 rows), the completions
    equal those of the admits that wait, token for token."""
    from orbit_core.rollout import decode_loop

    model, tok = load_model(tiny_checkpoint, device="cuda"), load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}*{b}=" * (1 + a % 3), add_special_tokens=False)["input_ids"] for a in range(5) for b in range(3)]
    params = SamplingParams(max_new_tokens=9, temperature=1.0)
    runs = {}
    for staged in (True, False):
        monkeypatch.setattr(decode_loop, "ASYNC_ADMIT", staged)
        engine = BuiltinEngine(model, tok, max_running=4, seed=5)
        runs[staged] = [engine.generate(prompts, params) for _ in range(2)]  # the second replays prefills
    for got, want in zip(runs[True], runs[False]):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.logprobs for c in got] == [c.logprobs for c in want]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_programmatic_dependent_launch_changes_no_token_or_logprob(tiny_checkpoint, tmp_path, monkeypatch):
    """Kernels launched to overlap the one before them wait for its results: a graphed int4 + LoRA
    engine decodes bit for bit what plain launches decode, at GEMV rows (3), packed GEMM rows (12)
    and tile rows (40). A kernel that read its input before waiting would race its producer and
    change the numbers; only frozen weights are read before the wait (``EARLY_READS``)."""
    from orbit_core.policy.load import load_base
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import _triton
    from tests.test_dequant_ahead import _with_lora

    if not _triton.pdl_args(torch.zeros(1, device="cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9 and a Triton that launches it")
    path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a in range(8) for b in range(5)]
    runs = {}
    for pdl in (True, False):
        monkeypatch.setattr(_triton, "PDL", pdl)
        model = _with_lora(load_base(path, "bfloat16", "cuda"))  # the same seeded factors each time
        engine = BuiltinEngine(model, tok, max_running=64, seed=3)
        params = SamplingParams(max_new_tokens=10, temperature=1.0)
        runs[pdl] = [engine.generate(prompts[:n], params) for n in (3, 12, len(prompts))]
        assert engine.loop.graphed is not None and engine.loop.graphed.graphs
    for on, off in zip(runs[True], runs[False]):
        for a, b in zip(on, off):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_reading_finished_rows_every_few_steps_changes_no_completion(tiny_checkpoint):
    """Graphed decoding flags finished rows on the device and reads them every few steps; rows run
    past their end meanwhile. Against the loop that checks every step: same tokens, logprobs, text
    and finish reasons, with rows ending by EOS, by a stop string and by length, and slots reused."""
    torch.manual_seed(0)
    engine, model, tok = _engine(tiny_checkpoint, max_running=3)
    prompts = _prompts(tok) * 2
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    plain = engine.generate(prompts, params)
    # an extra EOS the greedy model emits mid-sequence and a stop character it writes elsewhere,
    # chosen so that the rows end all three ways
    mid = [t for c in plain for t in c.token_ids[3:8]]
    digits = [ch for c in plain for ch in c.text[:5] if ch.isdigit()]
    base_config, runs = model.config, None
    for eos in sorted(set(mid), key=mid.count, reverse=True)[:4]:
        for stop in sorted(set(digits), key=digits.count, reverse=True)[:4]:
            model.config = dataclasses.replace(base_config, eos_token_ids=(*base_config.eos_token_ids, eos))
            params = SamplingParams(max_new_tokens=10, temperature=0.0, stop=(stop,))
            candidate = {}
            for check_every in (1, 4):
                engine = BuiltinEngine(model, tok, max_running=3, seed=3)
                engine.loop.check_every = check_every
                candidate[check_every] = engine.generate(prompts, params)
            if {c.finish_reason for c in candidate[1]} == {"eos", "stop", "length"}:
                runs = candidate
                break
        if runs:
            break
    assert runs, "no EOS / stop pair ends rows all three ways"
    for every_step, deferred in zip(runs[1], runs[4]):
        assert (deferred.token_ids, deferred.text, deferred.finish_reason) == \
            (every_step.token_ids, every_step.text, every_step.finish_reason)
        # admissions batch differently, so prefill logits differ in the last bits
        torch.testing.assert_close(torch.tensor(deferred.logprobs), torch.tensor(every_step.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("check_every", [1, 4])
def test_one_read_completes_rows_as_a_read_per_record_does(tiny_checkpoint, monkeypatch, check_every):
    """Completions read back in one wait (``ONE_READ``) against a read per record kind: the same
    tokens, logprobs, top-k ids and finish reasons, with rows ending by EOS and by length at
    different steps and slots reused."""
    from orbit_core.rollout import decode_loop

    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    eos = _prompts(tok)[0][-1]  # "=": a token the model writes often, as an extra EOS
    model.config = dataclasses.replace(model.config, eos_token_ids=(*model.config.eos_token_ids, eos))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, topk_ids=3)
    runs = {}
    for one_read in (True, False):
        monkeypatch.setattr(decode_loop, "ONE_READ", one_read)
        engine = BuiltinEngine(model, tok, max_running=3, seed=5)
        engine.loop.check_every = check_every
        runs[one_read] = engine.generate(_prompts(tok), params)
    assert {c.finish_reason for c in runs[True]} == {"eos", "length"}
    assert len({len(c.token_ids) for c in runs[True]}) > 2
    for one, each in zip(runs[True], runs[False]):
        assert (one.token_ids, one.logprobs, one.finish_reason, one.extra) == \
            (each.token_ids, each.logprobs, each.finish_reason, each.extra)


def test_deferred_checks_stop_decoding_where_the_length_limit_ends_every_row(tiny_checkpoint):
    """Reading finished rows every 4 steps must not run steps past ``max_new_tokens``: the host
    knows when a row reaches it, so the loop checks there (EOS is unknown to it; see above)."""
    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    model.config = dataclasses.replace(model.config, eos_token_ids=())
    tok.eos_token_id = None  # no row ends early: every one runs to the limit
    for max_new in (1, 6, 9):
        engine = BuiltinEngine(model, tok, max_running=4, seed=3)
        engine.loop.check_every = 4
        out = engine.generate(_prompts(tok)[:4], SamplingParams(max_new_tokens=max_new, temperature=1.0))
        assert [len(c.token_ids) for c in out] == [max_new] * 4
        assert {c.finish_reason for c in out} == {"length"}
        assert engine.loop.decode_steps == max_new - 1  # the prefill samples the first token


@pytest.mark.parametrize("probed", [True, False])
def test_probed_checks_end_an_eos_row_within_two_check_periods(tiny_checkpoint, monkeypatch, probed):
    """Between the host-known length limits a check first reads a probe of the flags sent to the
    host a check before: a row that samples EOS is completed within two check periods of it (one
    without probes), with the tokens of the loop that checks every step."""
    from orbit_core.rollout import decode_loop

    monkeypatch.setattr(decode_loop, "PROBED_CHECKS", probed)
    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    prompt = _prompts(tok)[4:]  # the greedy row samples EOS some 16 tokens in
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    plain = BuiltinEngine(model, tok, max_running=1, seed=3).generate(prompt, params)[0]
    at = len(plain.token_ids) - 1
    assert plain.finish_reason == "eos" and 8 < at < 40
    engine = BuiltinEngine(model, tok, max_running=1, seed=3)
    engine.loop.check_every = 4
    out = engine.generate(prompt, params)[0]
    assert (out.token_ids, out.finish_reason) == (plain.token_ids, "eos")
    # the prefill samples token 0 and decode step i token i: steps run past the end, boundedly
    assert 0 <= engine.loop.decode_steps - at <= (8 if probed else 4)


def test_generate_runs_without_dropout_and_puts_each_modules_mode_back(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    apply_lora(model, 4, 8, 0.5, ["all-linear"])  # dropout 0.5: a module left training would show in the logprobs
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    model.model.layers[0].eval()  # a mixed state, as a trainer freezing part of a model leaves it
    modes = {name: m.training for name, m in model.named_modules()}
    engine = BuiltinEngine(model, tok, max_running=4, seed=3)
    c = engine.generate(_prompts(tok)[:1], SamplingParams(max_new_tokens=5, temperature=1.0))[0]
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        expected = token_logprobs(model(ids[:, :-1]), ids[:, 1:], 1.0)[0, len(c.prompt_ids) - 1:]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_survives_an_earlier_engines_garbage(tiny_checkpoint, monkeypatch):
    """An engine dropped while its loop and graphs still reference each other is cyclic garbage. A
    collection in the middle of the next engine's capture destroyed those graphs and invalidated the
    capture (the engine then decoded eagerly, 8x slower in bench/decode_throughput.py). Here the
    collector runs right after every capture begins, whenever automatic collection is on."""
    import gc

    begin = torch.cuda.CUDAGraph.capture_begin

    def begin_then_collect(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        if gc.isenabled():
            gc.collect()

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", begin_then_collect)
    model, tok = load_model(tiny_checkpoint, device="cuda"), load_tokenizer(tiny_checkpoint)
    model.to("cuda")
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    dropped = BuiltinEngine(model, tok, max_running=2, seed=0)
    dropped.generate(_prompts(tok)[:2], params)
    assert dropped.loop.graphed.graphs
    del dropped  # its loop and graphs reference each other: only the collector frees them
    engine = BuiltinEngine(model, tok, max_running=4, seed=0)
    engine.generate(_prompts(tok)[:4], params)
    assert engine.loop.graphed.graphs and not engine.loop.graphed.failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_pairs_decode_what_the_rounding_decode_decodes(tiny_checkpoint, tmp_path, monkeypatch):
    """At 8 rows a graphed int4 engine (groups of 128, LoRA B nonzero) runs its linears through the
    x-split GEMM, which decodes the codes in bf16 pairs (``packed_gemm.INT4_PAIRS``): it samples
    the tokens the decode before samples, with logprobs within the weights' bf16 rounding of its."""
    from orbit_core.policy.load import load_base
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import packed_gemm
    from tests.conftest import PACKED_SHAPE, save_hf_model
    from tests.test_dequant_ahead import _with_lora

    tok = load_tokenizer(tiny_checkpoint)
    save_hf_model("qwen2", tmp_path / "dense", **PACKED_SHAPE, vocab_size=len(tok))  # 128 wide: groups of 128
    path = str(quantize_checkpoint(str(tmp_path / "dense"), str(tmp_path / "int4"), "int4", group_size=128))
    prompts = [tok(f"{a}*{b}=", add_special_tokens=False)["input_ids"] for a in range(4) for b in range(1, 3)]
    served = []

    def recorded(*args, _pairs=packed_gemm._pairs):
        served.append(_pairs(*args))
        return served[-1]

    monkeypatch.setattr(packed_gemm, "_pairs", recorded)
    runs = {}
    for pairs in (True, False):
        monkeypatch.setattr(packed_gemm, "INT4_PAIRS", pairs)
        served.clear()
        engine = BuiltinEngine(_with_lora(load_base(path, "bfloat16", "cuda")), tok, max_running=8, seed=3)
        runs[pairs] = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0))
        assert engine.loop.graphed is not None and engine.loop.graphed.graphs
        assert any(served) == pairs
    for on, off in zip(runs[True], runs[False]):
        assert on.token_ids == off.token_ids
        torch.testing.assert_close(torch.tensor(on.logprobs), torch.tensor(off.logprobs), atol=1e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_fused_shrinks_decode_what_the_unfused_kernels_decode(tiny_checkpoint, tmp_path, monkeypatch, fmt):
    """At 1 and 3 rows the graphed engine computes the q/k/v and gate/up shrinks with the norm
    (``orbit::add_rms_norm_shrink``; layer 0's with the embedding, ``orbit::embed_rms_norm_shrink``)
    and down's with the SwiGLU product (``orbit::silu_mul_shrink``):
    it samples the tokens the separate kernels sample, with logprobs within fp32 summation order of
    theirs. LoRA B is nonzero, so a wrong or stale ``t`` changes the numbers."""
    from orbit_core.policy.load import load_base
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import norm_shrink, silu_shrink
    from tests.test_dequant_ahead import _with_lora

    path = tiny_checkpoint
    if fmt == "int4":
        path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}*{b}=", add_special_tokens=False)["input_ids"] for a in range(3) for b in range(1, 3)]
    launches = {"norm": 0, "silu": 0, "embed": 0}
    for module, name, key in ((norm_shrink, "launch", "norm"), (silu_shrink, "launch", "silu"),
                              (norm_shrink, "launch_embed", "embed")):
        def counted(*args, _launch=getattr(module, name), _key=key):
            launches[_key] += 1
            return _launch(*args)
        monkeypatch.setattr(module, name, counted)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(norm_shrink, "ENABLED", fused)
        monkeypatch.setattr(silu_shrink, "ENABLED", fused)
        model = _with_lora(load_base(path, "bfloat16", "cuda"))
        engine = BuiltinEngine(model, tok, max_running=4, seed=3)
        params = SamplingParams(max_new_tokens=10, temperature=1.0)
        runs[fused] = [c for n in (1, 3) for c in engine.generate(prompts[:n], params)]
        assert engine.loop.graphed is not None and engine.loop.graphed.graphs
        if fused:
            layers = len(model.model.layers)
            assert launches["norm"] >= 2 * layers - 1 and launches["silu"] >= layers and launches["embed"] >= 1
            counts = dict(launches)
    assert launches == counts  # with the fusions off, neither kernel ran
    for on, off in zip(runs[True], runs[False]):
        assert on.token_ids == off.token_ids
        torch.testing.assert_close(torch.tensor(on.logprobs), torch.tensor(off.logprobs), atol=2e-3, rtol=0)


def test_quick_mode_walk_finds_the_modules_that_modules_finds(tiny_checkpoint, monkeypatch):
    """``training_modules``' own walk against ``Module.modules()``: the same modules in training mode,
    each once (a module shared by two parents too), and ``set_training`` sets what setattr sets."""
    from orbit_core.rollout import engine as engine_module

    model = load_model(tiny_checkpoint)
    apply_lora(model, 4, 8, 0.1, ["all-linear"])
    model.train()
    model.model.layers[0].eval()
    model.model.layers[1].mlp.shared = model.model.layers[0].mlp  # a second parent, in eval mode
    model.model.layers[1].mlp.shared.down_proj.train()
    found = {}
    for quick in (True, False):
        monkeypatch.setattr(engine_module, "QUICK_MODES", quick)
        found[quick] = engine_module.training_modules(model)
    assert len(found[True]) == len({id(m) for m in found[True]}) > 0
    assert {id(m) for m in found[True]} == {id(m) for m in found[False]}
    monkeypatch.setattr(engine_module, "QUICK_MODES", True)
    engine_module.set_training(found[True], False)
    assert not any(m.training for m in model.modules())
    engine_module.set_training(found[True], True)
    assert {id(m) for m in model.modules() if m.training} == {id(m) for m in found[False]}


def _decodes_alike_with_and_without(monkeypatch, module, switch: str, launch: str, path: str, tok, prompts,
                                    batches: tuple[int, ...], max_running: int, atol: float = 2e-2,
                                    parting_rows: int = 0) -> list[tuple]:
    """Graphed LoRA engines with ``module.switch`` on, then off, each generating ``prompts[:n]`` for
    ``n`` in ``batches``: the same tokens, logprobs within ``atol`` (a rounding of the logits), and
    ``module.launch`` called only with the switch on. Returns the arguments of each call.
    ``parting_rows``: up to this many completions may part from the other run's at a token where
    a rounding tipped the draw; up to that token they agree as above."""
    from orbit_core.policy.load import load_base
    from tests.test_dequant_ahead import _with_lora

    calls = []
    monkeypatch.setattr(module, launch, lambda *a, _launch=getattr(module, launch): calls.append(a) or _launch(*a))
    runs, seen = {}, 0
    for on in (True, False):
        monkeypatch.setattr(module, switch, on)
        engine = BuiltinEngine(_with_lora(load_base(path, "bfloat16", "cuda")), tok, max_running=max_running, seed=3)
        params = SamplingParams(max_new_tokens=8, temperature=1.0)
        runs[on] = [c for n in batches for c in engine.generate(prompts[:n], params)]
        assert engine.loop.graphed is not None and engine.loop.graphed.graphs
        if on:
            assert calls
            seen = len(calls)
    assert len(calls) == seen  # off, the kernel never ran
    parted = 0
    for on, off in zip(runs[True], runs[False]):
        shared = next((i for i, (a, b) in enumerate(zip(on.token_ids, off.token_ids)) if a != b), None)
        if shared is None:
            assert on.token_ids == off.token_ids
            shared = len(on.token_ids)
        else:
            parted += 1
        torch.testing.assert_close(torch.tensor(on.logprobs[:shared]), torch.tensor(off.logprobs[:shared]), atol=atol,
                                   rtol=0)
    assert parted <= parting_rows
    return calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lm_head_kernel_decodes_what_cublas_decodes(tiny_checkpoint, monkeypatch):
    """At one row the graphed engine's lm_head is ``orbit::dense_gemv`` (prefill and decode): it
    samples the tokens cuBLAS's lm_head samples, with logprobs within a rounding of the logits; at
    three rows it is not used."""
    from orbit_kernels import dense_gemv

    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a in range(3) for b in range(1, 3)]
    calls = _decodes_alike_with_and_without(monkeypatch, dense_gemv, "ENABLED", "launch", tiny_checkpoint, tok,
                                            prompts, (1, 1, 3), 3)
    assert all(x.numel() // x.shape[-1] == 1 for x, _ in calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_dense_lora_decodes_what_the_gemm_then_the_expand_decode(tiny_checkpoint, tmp_path, monkeypatch, fmt):
    """At 40 rows and their prefill (``MIN_ROWS`` lowered to reach them) a dense base's LoRA update written
    first and the GEMM adding onto it (``orbit::dense_lora_linear``; int4 through its weight
    dequantized ahead): the graphed engine samples the tokens the GEMM-then-expand order samples."""
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import dense_lora

    path = tiny_checkpoint
    if fmt == "int4":
        path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}*{b}=", add_special_tokens=False)["input_ids"] for a in range(8) for b in range(1, 6)]
    monkeypatch.setattr(dense_lora, "MIN_ROWS", 33)  # the tiny prompts' prefill and decode rows
    # every linear rounds its update before the product is added, not after: on an H100 the logprobs
    # moved by up to 0.072 (bf16 and int4), where the other switches' stay within 0.02 (one bf16 step
    # of a logit between 16 and 32 is 0.125), and one int4 completion of 40 drew another token at its
    # seventh step
    calls = _decodes_alike_with_and_without(monkeypatch, dense_lora, "ENABLED", "launch", path, tok, prompts, (40,), 40,
                                            atol=0.125, parting_rows=4)
    rows = {x.numel() // x.shape[-1] for x, *_ in calls}
    assert min(rows) <= 64 < max(rows)  # the decode step's rows (its graph's bucket) and the prefill's tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_shrink_beside_the_base_gemm_decodes_what_the_shrink_after_it_decodes(tiny_checkpoint, tmp_path, monkeypatch,
                                                                             fmt):
    """At 40 rows and their prefill the LoRA shrink on a side stream beside the base GEMM
    (``lora.SHRINK_BESIDE``, forked and joined inside the captured graphs): the engine samples the
    tokens the shrink after the GEMM samples."""
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import lora as lora_kernels

    path = tiny_checkpoint
    if fmt == "int4":
        path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}*{b}=", add_special_tokens=False)["input_ids"] for a in range(8) for b in range(1, 6)]
    _decodes_alike_with_and_without(monkeypatch, lora_kernels, "SHRINK_BESIDE", "_beside_stream", path, tok, prompts,
                                    (40,), 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_prefill_qk_kernel_decodes_what_the_unfused_kernels_decode(tiny_checkpoint, tmp_path, monkeypatch, fmt):
    """An engine prefill's q/k norms, rope and cache writes in one kernel (``orbit::prefill_qk_``),
    its attention reading the keys and values from the cache: the graphed engine samples the tokens
    the six unfused kernels sample, with logprobs within a rounding of theirs."""
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_kernels import qk_rope

    path = tiny_checkpoint
    if fmt == "int4":
        path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}-{b}=", add_special_tokens=False)["input_ids"] for a in range(3) for b in range(1, 3)]
    _decodes_alike_with_and_without(monkeypatch, qk_rope, "PREFILL", "launch_prefill", path, tok, prompts, (1, 3, 6), 4)
