"""SAR (I122): relevance-weighted uncertainty of a generated answer, a ``score``-kind analysis.

**TokenSAR** (the paper's token level). For a generated answer ``z = (z_1..z_n)`` (the plain greedy answer,
its trailing end-of-sequence token left out: convention ``sar-no-eos``):

* token relevance ``R_i = 1 - |cos(e(s), e(s \\ z_i))|`` (convention ``sar-answer-only``): ``s`` is the decoded
  answer, ``s \\ z_i`` the answer decoded without token ``i``, ``e`` a sentence embedding. The paper's similarity
  model embeds the prompt with the answer; here only the answer is embedded, so that a 256-token context does not
  drown the change one token makes. Embedding (convention ``minilm-mean``): all-MiniLM-L6-v2
  (``attnlab.models.hf.load_model("minilm")``), mean of the last hidden states over the attention mask, cosine;
* token uncertainty ``u_i = -log p(z_i | prompt, z_<i)`` (teacher-forced on the plain model, the same attention as
  the plain arm);
* ``TokenSAR = sum_i u_i R_i / sum_j R_j``. When every ``R_j`` is 0 (``sum < 1e-8``) the weights are uniform
  (convention ``sar-uniform-fallback``): TokenSAR is then the mean NLL.

Baselines on the same tokens: ``mean_nll`` (length-normalized predictive entropy of the one greedy answer, LN-PE
with a single sample) and ``max_nll``.

**SentSAR and SAR** (the paper's sentence level; knob ``samples`` K > 0, off by default: K more generations per
sample). K answers ``s_1..s_K`` sampled from the plain model at temperature 1 (seeded: ``torch.Generator`` seed
``seed``), one prefill and a copy of its cache per answer; per answer its token NLLs under the model (the sampling
distribution) and its TokenSAR. Sentence similarity ``g(s_j, s_k) = max(0, cos(e(s_j), e(s_k)))`` (convention
``sent-cos+``: the paper's similarity is a cross-encoder score in [0, 1]). With ``p_j`` a probability of answer j:

    ER_j = -log(p_j + (1/t) sum_{k != j} g(s_j, s_k) p_k),    score = (1/K) sum_j ER_j

``sent_sar``: ``p_j = exp(-sum_i NLL_ij)`` (the answer's probability); ``sar``: ``p_j = exp(-TokenSAR_j)`` (the
token-shifted probability: both levels together, the paper's SAR); ``t`` = knob ``t`` (0.001, the paper's).
Sample-set baselines: ``pe`` = mean over the K answers of their total NLL (predictive entropy, Monte Carlo) and
``ln_pe`` = mean of their mean token NLL.

Scored by the runner (:mod:`attnlab.interventions.scoring`): AUROC of each measure for predicting an incorrect
answer (label 1 = the task's score of the plain greedy answer below 0.5; higher uncertainty should predict it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import scoring as S

Embed = Callable[[Sequence[str]], Tensor]  # texts -> (n, d)

_EMBEDDERS: dict[str, Embed] = {}


def minilm_embedder(model: nn.Module, tok: Any, batch: int = 32) -> Embed:
    """Sentence embeddings of a BERT-style encoder: mean of the last hidden states over the attention mask,
    ``(n, d)`` float32, unit length (all-MiniLM-L6-v2's own pooling)."""

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = tok(list(texts[i:i + batch]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (b, t, d)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)

    return embed


def embedder(name: str) -> Embed:
    """The sentence embedder ``name`` (``minilm``), loaded once per process (tests may put one here)."""
    if name not in _EMBEDDERS:
        if name != "minilm":
            raise ValueError(f"embedder must be 'minilm', got {name!r}")
        from ..models.hf import load_model

        model, tok = load_model("minilm")
        _EMBEDDERS[name] = minilm_embedder(model.eval(), tok)
    return _EMBEDDERS[name]


def token_relevance(ids: Sequence[int], decode: Callable[[list[int]], str], embed: Embed) -> Tensor:
    """``R_i = 1 - |cos(e(decode(ids)), e(decode(ids without i)))|``, ``(n,)`` float64 in [0, 1].

    Args: ids (n,) the answer's tokens; decode: ids -> text; embed: texts -> (m, d) embeddings.
    """
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("token_relevance needs at least one token")
    texts = [decode(ids)] + [decode(ids[:i] + ids[i + 1:]) for i in range(len(ids))]
    e = embed(texts).double()
    e = torch.nn.functional.normalize(e, dim=-1)
    cos = (e[1:] @ e[0]).abs().clamp(max=1.0)
    rel = 1.0 - cos
    # identical texts embed identically: their relevance is exactly 0, not float noise
    same = torch.tensor([t == texts[0] for t in texts[1:]])
    return torch.where(same, torch.zeros_like(rel), rel)


def token_sar(nll: Tensor, relevance: Tensor, eps: float = 1e-8) -> float:
    """``sum_i nll_i R_i / sum_j R_j`` (uniform weights when ``sum_j R_j < eps``). nll, relevance: (n,)."""
    nll, relevance = torch.as_tensor(nll, dtype=torch.float64), torch.as_tensor(relevance, dtype=torch.float64)
    if nll.shape != relevance.shape or nll.dim() != 1 or nll.numel() == 0:
        raise ValueError(f"nll and relevance must be equal non-empty vectors, got {tuple(nll.shape)} and "
                         f"{tuple(relevance.shape)}")
    if (relevance < 0).any():
        raise ValueError("relevance must be non-negative")
    total = relevance.sum()
    if total < eps:
        return float(nll.mean())
    return float((nll * relevance).sum() / total)


@torch.no_grad()
def token_nll(model: nn.Module, prompt: Sequence[int], new: Sequence[int]) -> Tensor:
    """``-log p(new_i | prompt, new_<i)`` of each new token, ``(n,)`` float64, one teacher-forced pass."""
    n = len(new)
    if n == 0:
        raise ValueError("token_nll needs at least one new token")
    x = torch.tensor([list(prompt) + list(new)])
    logits = model(input_ids=x, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, torch.tensor(list(new)).view(-1, 1)).squeeze(-1)


def answer_tokens(new: Sequence[int], eos: Any) -> list[int]:
    """The answer's tokens: trailing end-of-sequence ids dropped (``sar-no-eos``), unless nothing else is left."""
    out = [int(t) for t in new]
    stop = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    while out and out[-1] in stop:
        out.pop()
    return out or [int(t) for t in new]


def sentence_score(logp: Sequence[float], sim: Tensor, t: float) -> float:
    """``(1/K) sum_j -log(p_j + (1/t) sum_{k != j} sim_jk p_k)`` with ``p_j = exp(logp_j)``.

    Args: logp (K,) log-probabilities of the answers; sim (K, K) similarities in [0, 1] (the diagonal is
    ignored); t > 0 (``math.inf``: no relevance term, the mean of ``-logp``). Computed in log space.
    """
    lp = torch.as_tensor(list(logp), dtype=torch.float64)
    K = lp.numel()
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if K == 0 or sim.shape != (K, K):
        raise ValueError(f"need K >= 1 answers and a (K, K) similarity, got K={K} and {tuple(sim.shape)}")
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    if math.isinf(t):
        return float((-lp).mean())
    off = sim.clone().fill_diagonal_(0.0).clamp(min=0.0)
    # log(p_j + (1/t) sum_k sim_jk p_k) = logsumexp([lp_j, log(sim_jk) + lp_k - log t for k])
    with torch.no_grad():
        terms = torch.cat([lp.view(-1, 1), torch.log(off) + lp.view(1, -1) - math.log(t)], dim=1)
    return float((-torch.logsumexp(terms, dim=1)).mean())


@torch.no_grad()
def sample_answers(model: nn.Module, prompt: Sequence[int], k: int, max_new_tokens: int, new_cache: Callable[[], Any],
                   eos: Any = None, seed: int = 0) -> list[tuple[list[int], Tensor]]:
    """``k`` answers sampled at temperature 1 (one prefill, a copy of its cache each; seeded), each with its
    tokens' NLLs ``(n,)`` float64 under the model."""
    stop = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    gen = torch.Generator().manual_seed(int(seed))
    cache = new_cache()
    first = model(input_ids=torch.tensor([list(prompt)]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    out = []
    for _ in range(k):
        c, logits, toks, nlls = copy.deepcopy(cache), first, [], []
        while len(toks) < max_new_tokens:
            logp = torch.log_softmax(logits.double(), -1)
            nxt = int(torch.multinomial(logp.exp(), 1, generator=gen))
            toks.append(nxt)
            nlls.append(-float(logp[nxt]))
            if nxt in stop:
                break
            logits = model(input_ids=torch.tensor([[nxt]]), cache=c, use_cache=True).logits[0, -1]
        out.append((toks, torch.tensor(nlls, dtype=torch.float64)))
    return out


def sentence_measures(model: nn.Module, tok: Any, knobs: dict[str, Any], prompt: Sequence[int], max_new: int,
                      base: Any, eos: Any) -> dict[str, float]:
    """SentSAR, SAR and the sample-set baselines over ``knobs["samples"]`` sampled answers."""
    embed = embedder(str(knobs["embedder"]))
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    answers = sample_answers(model, prompt, int(knobs["samples"]), max_new, base.new_cache, eos, int(knobs["seed"]))
    total, tsar, texts = [], [], []
    for toks, nll in answers:
        keep = len(answer_tokens(toks, eos))  # sar-no-eos, as for the greedy answer
        ans, nll = toks[:keep], nll[:keep]
        total.append(float(nll.sum()))
        tsar.append(token_sar(nll, token_relevance(ans, dec, embed)))
        texts.append(dec(ans))
    e = torch.nn.functional.normalize(embed(texts).double(), dim=-1)
    sim = (e @ e.T).clamp(min=0.0, max=1.0)
    t = float(knobs["t"])
    mean_nll = [tot / len(answer_tokens(tk, eos)) for tot, (tk, _) in zip(total, answers)]
    return {"sent_sar": sentence_score([-x for x in total], sim, t), "sar": sentence_score([-x for x in tsar], sim, t),
            "pe": float(sum(total) / len(total)), "ln_pe": float(sum(mean_nll) / len(mean_nll))}


def measures(model: nn.Module, tok: Any, knobs: dict[str, Any], prompt: Sequence[int], new: Sequence[int],
             base: Any = None, eos: Any = None, max_new_tokens: int | None = None) -> dict[str, float]:
    """The scorer: ``token_sar``, ``mean_nll``, ``max_nll`` and ``tokens`` of the plain answer ``new``; with
    ``samples`` > 0 also ``sent_sar``, ``sar``, ``pe``, ``ln_pe`` over sampled answers of at most ``max_new``
    tokens (default: the greedy answer's budget ``max_new_tokens``, else its length)."""
    ans = answer_tokens(new, eos)
    nll = token_nll(model, prompt, ans)
    rel = token_relevance(ans, lambda ids: tok.decode(ids, skip_special_tokens=True), embedder(str(knobs["embedder"])))
    out = {"token_sar": token_sar(nll, rel), "mean_nll": float(nll.mean()), "max_nll": float(nll.max()),
           "tokens": float(len(ans)), "relevance_sum": float(rel.sum())}
    if int(knobs.get("samples") or 0) > 0:
        if base is None:
            raise ValueError("sar: sampled answers need the run's Base (its caches)")
        out.update(sentence_measures(model, tok, knobs, prompt, int(knobs.get("max_new") or max_new_tokens or len(new)), base, eos))
    return out


S.register_scorer(S.Scorer("sar", measures,
                           auroc=("token_sar", "mean_nll", "max_nll", "sent_sar", "sar", "pe", "ln_pe")))


def _register() -> None:
    from . import registry as R

    def build(model, tok, knobs, tensors) -> R.Applied:
        return R.Applied("sar", S.KIND, dict(knobs))

    R.register(R.Spec(
        "sar", S.KIND, ("I122",),
        "SAR uncertainty of the plain greedy answer (TokenSAR: token NLLs weighted by each token's relevance, "
        "1 - |cos| of the answer's embedding with and without it), scored by AUROC of predicting a wrong answer; "
        "baselines mean and max token NLL; samples=K adds SentSAR and SAR over K sampled answers",
        (R.Knob("embedder", "str", "minilm", "the sentence-embedding model of the relevance", ("minilm",)),
         R.Knob("samples", "int", 0, "K sampled answers for SentSAR / SAR (0: TokenSAR and the greedy baselines "
                "only)"),
         R.Knob("t", "float", 0.001, "SentSAR's temperature t (relevance term divided by t)"),
         R.Knob("seed", "int", 0, "seed of the sampled answers"),
         R.Knob("max_new", "int", None, "new tokens of a sampled answer at most", unset="the task's own budget")),
        ("faithful", "mdqa", "kv"), build))


_register()

__all__ = ["answer_tokens", "embedder", "measures", "minilm_embedder", "sample_answers", "sentence_measures",
           "sentence_score", "token_nll", "token_relevance", "token_sar"]
