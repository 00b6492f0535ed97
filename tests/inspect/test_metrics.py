"""Head metrics on attention weights whose answers are known, and the chunked recorder against the oracle."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from attnlab.inspect.capture import Recorder, record
from attnlab.inspect.metrics import (
    HeadStats,
    MetricConfig,
    ProbeSpec,
    basin_score,
    head_metrics,
    massive_activations,
    retrieval_score,
)
from attnlab.models import hf


def causal_uniform(T: int) -> torch.Tensor:
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).view(T, 1)


def one_hot_rows(T: int, cols: list[int]) -> torch.Tensor:
    w = torch.zeros(T, T)
    w[torch.arange(T), torch.tensor(cols)] = 1.0
    return w


def test_sink_head_and_previous_token_head():
    T = 40
    sink = one_hot_rows(T, [0] * T)
    prev = one_hot_rows(T, [0] + list(range(T - 1)))
    m, _ = head_metrics(torch.stack([sink, prev]), MetricConfig(window=4, sink_tokens=2))
    assert m["sink"][0] == pytest.approx(1.0) and m["sink"][1] == pytest.approx(2 / T)
    assert m["prev_token"][0] == pytest.approx(1 / (T - 1))  # only row 1's previous token is the first
    assert m["prev_token"][1] == pytest.approx(1.0)
    assert m["entropy"][0] == pytest.approx(0.0, abs=1e-6) and m["entropy"][1] == pytest.approx(0.0, abs=1e-6)
    assert m["distance"][0] == pytest.approx(sum(range(T)) / T)  # row i looks i tokens back
    assert m["distance"][1] == pytest.approx((T - 1) / T)
    assert m["locality"][0] == pytest.approx(0.0) and m["locality"][1] == pytest.approx(1.0)
    assert m["streaming"][0] == pytest.approx(1.0) and m["streaming"][1] == pytest.approx(1.0)


def test_uniform_causal_entropy_distance_locality():
    T, W, S = 30, 5, 2
    m, _ = head_metrics(causal_uniform(T).unsqueeze(0), MetricConfig(window=W, sink_tokens=S), chunk=7)
    assert float(m["entropy"][0]) == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T, rel=1e-5)
    assert float(m["entropy_norm"][0]) == pytest.approx(1.0, rel=1e-5)
    assert float(m["distance"][0]) == pytest.approx(sum(i / 2 for i in range(T)) / T, rel=1e-5)
    rows = [i for i in range(T) if i + 1 > S + W]
    assert float(m["locality"][0]) == pytest.approx(sum(W / (i + 1) for i in rows) / len(rows), rel=1e-5)
    assert float(m["streaming"][0]) == pytest.approx(sum((W + S) / (i + 1) for i in rows) / len(rows), rel=1e-5)
    assert float(m["sink"][0]) == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T, rel=1e-5)


def test_induction_score_on_repeated_sequence():
    n = 12
    g = torch.Generator().manual_seed(0)
    seq = torch.randperm(100, generator=g)[:n].tolist()
    toks = [999] + seq + seq  # BOS + x + x
    T = len(toks)
    # induction head: second-copy token x_i at position n+1+i attends to position i+2 (the token after x_i)
    cols = [0] * T
    for t in range(n + 1, T):
        cols[t] = t - n + 1
    ind = one_hot_rows(T, cols)
    prev = one_hot_rows(T, [0] + list(range(T - 1)))
    m, _ = head_metrics(torch.stack([ind, prev, causal_uniform(T)]), spec=ProbeSpec(tokens=tuple(toks)))
    assert float(m["induction"][0]) == pytest.approx(1.0)
    assert float(m["induction"][1]) == pytest.approx(0.0)
    expected = sum(1 / (t + 1) for t in range(n + 1, T)) / n  # one target among t+1 keys
    assert float(m["induction"][2]) == pytest.approx(expected, rel=1e-5)


def test_lookback_ratio():
    T, N = 20, 12
    ctx_only = torch.zeros(T, T)
    ctx_only[:, 0] = 1.0
    m, _ = head_metrics(torch.stack([causal_uniform(T), ctx_only, one_hot_rows(T, list(range(T)))]),
                        spec=ProbeSpec(context_len=N))
    assert float(m["lookback"][0]) == pytest.approx(0.5, rel=1e-5)  # equal mean weight on every visible key
    assert float(m["lookback"][1]) == pytest.approx(1.0)
    assert float(m["lookback"][2]) == pytest.approx(0.0)  # attends to itself, a generated token


def test_positional_profile_and_basin():
    T, N = 41, 33  # context keys 1..32 in 8 bins of 4, question rows 33..40
    flat = causal_uniform(T)
    u = torch.zeros(T, T)
    u[:, 0] = 1.0
    for i in range(N, T):
        u[i, 0] = 0.0
        u[i, [1, 2, 31, 32]] = 0.2
        u[i, list(range(3, 31))] = 0.2 / 28
    prof_heads, stats = head_metrics(torch.stack([flat, u]), spec=ProbeSpec(context_len=N))
    prof = stats.profile()
    assert torch.allclose(prof[0], torch.full((8,), 1 / 8, dtype=prof.dtype), atol=1e-6)
    assert float(prof_heads["basin"][0]) == pytest.approx(1.0, rel=1e-5)
    assert float(prof_heads["basin"][1]) > 5
    assert float(basin_score(torch.tensor([0.3, 0.1, 0.1, 0.5]))) == pytest.approx(4.0)


def test_retrieval_score():
    # tokens: context with needle [7, 8, 9] at positions 2..4, answer copies it at rows 10..12
    tokens = torch.tensor([1, 5, 7, 8, 9, 5, 5, 5, 5, 5, 6, 7, 8, 9])
    needle_pos = torch.tensor([2, 3, 4])
    answer_rows = torch.tensor([10, 11, 12])  # row i predicts tokens[i + 1]
    predicted = tokens.roll(-1)
    argmax = torch.zeros(3, 14, dtype=torch.int32)
    argmax[0, answer_rows] = torch.tensor([2, 3, 4], dtype=torch.int32)  # copies every needle token
    argmax[1, answer_rows] = torch.tensor([2, 2, 2], dtype=torch.int32)  # right only for the first
    argmax[2, answer_rows] = torch.tensor([11, 12, 13], dtype=torch.int32)  # looks at the answer, not the needle
    r = retrieval_score(argmax, answer_rows, needle_pos, tokens, predicted)
    assert r.tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    wrong = predicted.clone()
    wrong[11] = 0  # the model would not have generated the token: no copy-paste event there
    assert retrieval_score(argmax, answer_rows, needle_pos, tokens, wrong)[0] == pytest.approx(2 / 3)


def test_massive_activations():
    h = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    assert massive_activations(h)["count"] == 0
    h[3, 17] = -2500.0
    r = massive_activations(h)
    assert (r["token"], r["dim"], r["count"]) == (3, 17, 1) and r["ratio"] > 1000


def _ctx(layer: int, rows: tuple[int, int], causal: bool = True, mask=None, q_offset: int = 0):
    """What the hook seam hands a weights observer (the fields the recorder reads)."""
    mod = torch.nn.Module()
    mod.is_causal = causal
    return SimpleNamespace(name=f"blocks.{layer}.attn.weights", layer=layer, module=mod, q_offset=q_offset,
                           scale=1.0, rows=rows, runner=None, mask=mask)


def test_recorder_on_chunks_matches_oracle_and_stays_chunked():
    """Recorder fed chunk by chunk == metrics of the oracle's full weights; it never holds more than a chunk."""
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention
    from attnlab.core.softmax import weights_chunks

    g = torch.Generator().manual_seed(0)
    H, Hkv, T, D = 6, 2, 50, 8
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    cfg = MetricConfig(chunk=8, window=4, sink_tokens=2, rollout_max=64)
    spec = ProbeSpec(tokens=tuple(range(25)) * 2, context_len=40)
    rec = Recorder(cfg, spec)
    causal = Causal().dense(T, T, 0).view(1, 1, T, T)
    for start, w in weights_chunks(q, k, scale=D ** -0.5, mask=causal, rows=20):  # the seam's chunks: 20 rows
        rec.weights(w, _ctx(0, (start, start + w.shape[2])))
    _, w = reference_attention(q, k, v, Causal(), return_weights=True)
    want, _ = head_metrics(w[0].float(), cfg, spec)
    got = rec.stats[0].finalize()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, equal_nan=True), name
    assert rec.stats[0].largest_chunk == H * 8 * T  # split to the recorder's own chunk of rows
    assert torch.allclose(rec.stats[0].mean_map, w[0].float().mean(0), atol=1e-5)
    assert torch.equal(rec.stats[0].argmax.long(), w[0].argmax(-1))
    with pytest.raises(ValueError, match="one sequence"):
        rec.weights(torch.zeros(2, H, 4, T), _ctx(0, (0, 4)))


def test_per_head_visibility_from_the_hook_mask():
    """Under a per-head rule (ctx.mask with heads), entropy_norm and locality count each head's own keys."""
    T, H = 30, 2
    cfg = MetricConfig(chunk=7, window=4, sink_tokens=1)
    full = torch.tril(torch.ones(T, T, dtype=torch.bool))
    kpos, qpos = torch.arange(T).view(1, T), torch.arange(T).view(T, 1)
    local = full & (qpos - kpos < 3)  # head 1 sees its last 3 keys only
    mask = torch.stack([full, local]).unsqueeze(0)  # (1, H, T, T)
    w = mask.double() / mask.sum(-1, keepdim=True)  # uniform over what each head sees
    rec = Recorder(cfg)
    for s in range(0, T, 11):
        e = min(T, s + 11)
        rec.weights(w[:, :, s:e].float(), _ctx(0, (s, e), mask=mask[:, :, s:e]))
    got = rec.stats[0].finalize()
    assert torch.allclose(got["entropy_norm"], torch.ones(H, dtype=torch.float64), atol=1e-6)  # uniform: 1
    want, _ = head_metrics(w[0].float(), cfg, visible=mask[0].sum(-1))
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, equal_nan=True), name
    # head 1 never sees more than sink_tokens + window keys: locality falls back to all its rows (= 1)
    assert float(got["locality"][1]) == pytest.approx(1.0)
    assert float(got["locality"][0]) < 0.9


def test_record_in_model_matches_eager_attentions():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64)).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    cfg = MetricConfig(chunk=5, window=4, sink_tokens=1)
    with torch.no_grad():
        eager = model(ids, output_attentions=True)
    cap = record(model, ids, cfg, logits_rows=0)
    assert torch.equal(cap.predicted, eager.logits[0].argmax(-1))
    assert cap.stats[0].largest_chunk <= 4 * 5 * 24  # heads x chunk x T: never the whole square
    assert set(cap.massive) == {0, 1}
    for layer in range(2):
        want, _ = head_metrics(eager.attentions[layer][0], cfg)
        got = cap.stats[layer].finalize()
        for name in ("sink", "entropy", "distance", "prev_token", "locality"):
            assert torch.allclose(got[name], want[name], atol=1e-4), (layer, name)
    assert model.config._attn_implementation == "eager"
    assert isinstance(cap.stats[0], HeadStats) and hf.geometry(model).num_kv_heads == 2
