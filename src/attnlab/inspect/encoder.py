"""BERT-style attention analyses of Clark et al., "What Does BERT Look At?" (A208), for encoders and decoders.

Per head (``token_kind_attention``; ``A[i, j]`` = weight of query ``i`` on key ``j``, means over every valid
query row of every sequence, special tokens' rows included, as the paper averages over all tokens):

* ``cls`` / ``sep``: mean mass ``sum_{j in kind} A[i, j]`` on the [CLS] / [SEP] tokens. Decoders have no
  [CLS]/[SEP]: the start token is the tokenizer's BOS and the separator its EOS, where present
  (``special_ids``). In a causal model the BOS is also the first token, i.e. the attention sink.
* ``punct``: mass on punctuation tokens (every character of the decoded token, stripped, is Unicode category
  P*; the paper's figure uses periods and commas, we take all punctuation).
* ``next`` / ``prev``: mean ``A[i, i+1]`` over rows that have a next token, ``A[i, i-1]`` over rows ``i >= 1``
  (0 for ``next`` in decoders: causal heads cannot see it).

Head clustering (``js_distances``): the distance between heads ``a`` and ``b`` is the Jensen-Shannon divergence
(natural log, so in [0, ln 2]) between their attention distributions, per query token, averaged over the
tokens -- the paper sums over the tokens of its data (a constant factor away); ``sqrt=True`` averages the
Jensen-Shannon *distance* ``sqrt(JS)`` instead (a metric per token). ``classical_mds`` embeds the matrix in 2-D
(Torgerson: double-centred squared distances, top eigenvectors), ``plot_head_embedding`` draws it with
matplotlib, one colour per layer.

``encoder_analysis(model, tok, texts)`` runs all of it on a model: each text (or pair of texts: [CLS] a [SEP]
b [SEP] in BERT, BOS a EOS b in decoders) goes through the model once, the weights come from the seam's
``blocks.*.attn.weights`` point (``hf.run_with_cache``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import hf
from .capture import forward_kwargs
from .metrics import check_weights
from .probes import token_labels

KINDS = ("cls", "sep", "punct", "next", "prev")

# short texts of our own, with punctuation, and pairs for [SEP] between segments
TEXTS: tuple[str | tuple[str, str], ...] = (
    "The committee met on Tuesday, and the vote was postponed again.",
    "She opened the window; cold air filled the small kitchen.",
    ("The bridge was closed for repairs.", "Drivers took the longer road through the valley."),
    "Although the forecast promised sun, it rained all afternoon.",
    "He asked, quietly, whether the museum was still open.",
    ("Our train left at seven.", "By noon we had reached the coast, tired but happy."),
    "The results, published last week, surprised almost everyone in the field.",
    "Bring bread, cheese and two apples; we will eat by the lake.",
    ("Why did the lights go out?", "A storm had damaged the power line near the farm."),
    "When the music stopped, the children sat down on the wooden floor.",
    "The old map showed three rivers, a forest and a single road.",
    ("I finished the report.", "Now, finally, I can read the book you gave me."),
)


# ---------------------------------------------------------------------------------------------------------
# token kinds
# ---------------------------------------------------------------------------------------------------------
def special_ids(tok) -> tuple[int | None, int | None]:
    """(start id, separator id): [CLS] / [SEP] where the tokenizer has them, else BOS / EOS (None if absent)."""
    start = getattr(tok, "cls_token_id", None)
    sep = getattr(tok, "sep_token_id", None)
    if start is None or sep is None:
        start, sep = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    return start, sep


def is_punctuation(text: str) -> bool:
    """True when ``text`` stripped is non-empty and every character is Unicode punctuation (category P*)."""
    s = text.strip()
    return bool(s) and all(unicodedata.category(c).startswith("P") for c in s)


def encode(tok, item: str | tuple[str, str]) -> dict[str, list[int]]:
    """Ids (and BERT's token type ids) of one text or pair: the tokenizer's own [CLS] a [SEP] b [SEP] when it
    has [CLS]/[SEP], else ``BOS a EOS b`` (BOS only if the tokenizer has one; EOS only between segments, since
    in a causal model a final EOS is seen by no other token)."""
    if isinstance(item, str):
        a, b = item, None
    elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        a, b = item
    else:
        raise ValueError(f"a text is a string or a pair of strings, got {item!r}")
    if getattr(tok, "cls_token_id", None) is not None and getattr(tok, "sep_token_id", None) is not None:
        enc = tok(a, b) if b is not None else tok(a)
        out = {"input_ids": list(enc["input_ids"])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out
    start, sep = special_ids(tok)
    ids = [] if start is None else [start]
    ids += tok(a, add_special_tokens=False)["input_ids"]
    if b is not None:
        if sep is None:
            raise ValueError("this tokenizer has neither [SEP] nor EOS to separate a pair of texts")
        ids += [sep] + tok(b, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids}


def token_kinds(tok, ids: Sequence[int]) -> dict[str, Tensor]:
    """Bool masks ``(T,)`` of the key kinds ``cls``, ``sep`` and ``punct`` in ``ids``."""
    start, sep = special_ids(tok)
    t = torch.tensor(list(ids))
    never = torch.zeros(len(t), dtype=torch.bool)
    specials = set(getattr(tok, "all_special_ids", []))
    punct = torch.tensor([i not in specials and is_punctuation(s) for i, s in zip(ids, token_labels(tok, list(ids)))],
                         dtype=torch.bool)
    return {"cls": never.clone() if start is None else t == start, "sep": never.clone() if sep is None else t == sep,
            "punct": punct}


# ---------------------------------------------------------------------------------------------------------
# per-head attention to token kinds and offsets
# ---------------------------------------------------------------------------------------------------------
def _check_maps(weights: Tensor, valid: Tensor | None) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be (batch, heads, T, T) self-attention maps, got {shape}")
    B, _, T, _ = weights.shape
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    if tuple(valid.shape) != (B, T) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool (batch, T) = ({B}, {T}) mask, got {valid.dtype} {tuple(valid.shape)}")
    if not bool(valid.any()):
        raise ValueError("valid marks no token")
    check_weights(weights)
    return valid


def token_kind_attention(weights: Tensor, kinds: dict[str, Tensor], valid: Tensor | None = None) -> dict[str, Tensor]:
    """Mean attention of each head to token kinds and to the next / previous token.

    Args:
        weights: ``(B, H, T, T)`` attention maps (zero-padded beyond each sequence's length).
        kinds: name -> bool ``(B, T)`` key mask (e.g. ``cls``, ``sep``, ``punct``).
        valid: bool ``(B, T)``, the real tokens of each sequence (default: all); only their rows are averaged.

    Returns name -> ``(H,)`` float64 for every kind (NaN where the kind occurs in no valid position) and for
    ``next`` / ``prev``.
    """
    valid = _check_maps(weights, valid)
    B, H, T, _ = weights.shape
    w = weights.double()
    rows = valid.double()  # (B, T)
    n_rows = rows.sum()
    out: dict[str, Tensor] = {}
    for name, mask in kinds.items():
        if tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
            raise ValueError(f"kind {name!r}: need a bool (batch, T) = ({B}, {T}) mask, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        key = (mask & valid).double()  # (B, T)
        if not bool(key.any()):
            out[name] = torch.full((H,), float("nan"), dtype=torch.float64)
            continue
        mass = torch.einsum("bhij,bj->bhi", w, key)  # (B, H, T) mass of each row on the kind
        out[name] = torch.einsum("bhi,bi->h", mass, rows) / n_rows
    nxt = valid[:, :-1] & valid[:, 1:]  # row i has a next token i + 1
    diag_next = torch.diagonal(w, offset=1, dim1=-2, dim2=-1)  # (B, H, T-1): A[i, i+1]
    diag_prev = torch.diagonal(w, offset=-1, dim1=-2, dim2=-1)  # (B, H, T-1): A[i+1, i]
    nan = torch.full((H,), float("nan"), dtype=torch.float64)
    cnt = nxt.double().sum()
    out["next"] = torch.einsum("bhi,bi->h", diag_next, nxt.double()) / cnt if cnt > 0 else nan
    out["prev"] = torch.einsum("bhi,bi->h", diag_prev, nxt.double()) / cnt if cnt > 0 else nan.clone()
    return out


# ---------------------------------------------------------------------------------------------------------
# head clustering: Jensen-Shannon distances and classical MDS
# ---------------------------------------------------------------------------------------------------------
def _neg_entropy(p: Tensor) -> Tensor:
    """``sum x log x`` along the last dim (0 log 0 = 0)."""
    return torch.xlogy(p, p).sum(-1)


def _js(p: Tensor, q: Tensor, np_: Tensor | None = None, nq: Tensor | None = None) -> Tensor:
    """JS divergence (nats) along the last dim, broadcasting: ``H(M) - (H(P) + H(Q)) / 2`` with ``M`` the
    mixture (equal to ``KL(P||M)/2 + KL(Q||M)/2``); ``np_`` / ``nq``: precomputed ``sum x log x``."""
    np_ = _neg_entropy(p) if np_ is None else np_
    nq = _neg_entropy(q) if nq is None else nq
    return (0.5 * (np_ + nq) - _neg_entropy((p + q) / 2)).clamp_min(0.0)  # rounding can give -1e-17


def js_distances(dists: Tensor, sqrt: bool = False) -> Tensor:
    """``(N, N)`` distances between ``N`` heads from their attention distributions ``(N, R, K)`` (row ``r`` of
    every head is the same query token; rows sum to 1): mean over the ``R`` tokens of the JS divergence
    (``sqrt``: of the JS distance ``sqrt(JS)``). Symmetric, zero diagonal, float64."""
    if not isinstance(dists, Tensor) or dists.dim() != 3 or min(dists.shape) == 0:
        shape = tuple(dists.shape) if isinstance(dists, Tensor) else type(dists).__name__
        raise ValueError(f"dists must be a non-empty (heads, tokens, keys) tensor, got {shape}")
    p = dists.double()
    if not bool(torch.isfinite(p).all()) or float(p.min()) < -1e-9:
        raise ValueError("dists must be finite and non-negative (attention distributions)")
    sums = p.sum(-1)
    if float((sums - 1).abs().max()) > 1e-3:
        raise ValueError(f"each row of dists must sum to 1 (a distribution); sums range over "
                         f"[{float(sums.min()):.4g}, {float(sums.max()):.4g}]")
    p = p.clamp_min(0.0)
    N = p.shape[0]
    D = torch.zeros(N, N, dtype=torch.float64)
    ne = _neg_entropy(p)  # (N, R), once per head
    for a in range(N):  # one head against the rest: (N - a, R, K) at a time, never (N, N, R, K)
        js = _js(p[a:a + 1], p[a:], ne[a:a + 1], ne[a:])  # (N - a, R)
        d = (js.sqrt() if sqrt else js).mean(-1)
        D[a, a:] = d
        D[a:, a] = d
    D.fill_diagonal_(0.0)
    return D


def classical_mds(D: Tensor, dim: int = 2) -> tuple[Tensor, Tensor]:
    """Classical (Torgerson) MDS of a distance matrix ``D`` ``(N, N)``.

    ``B = -1/2 J D^2 J`` (``J`` centres), coordinates = top ``dim`` eigenvectors times sqrt(eigenvalue)
    (negative eigenvalues, from non-Euclidean distances, count as 0). Returns ``(coords (N, dim),
    eigenvalues (N,) descending)``; the share of the positive eigenvalues kept says how faithful 2-D is.
    """
    if not isinstance(D, Tensor) or D.dim() != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 1:
        raise ValueError(f"D must be a square (N, N) distance matrix, got {getattr(D, 'shape', type(D))}")
    D = D.double()
    if not bool(torch.isfinite(D).all()):
        raise ValueError("D contains NaN or inf")
    scale = float(D.abs().max()) or 1.0
    if float((D - D.T).abs().max()) > 1e-8 * scale or float(D.diagonal().abs().max()) > 1e-8 * scale:
        raise ValueError("D must be symmetric with a zero diagonal")
    if float(D.min()) < 0:
        raise ValueError("distances must be non-negative")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    N = D.shape[0]
    J = torch.eye(N, dtype=torch.float64) - 1.0 / N
    B = -0.5 * J @ (D ** 2) @ J
    vals, vecs = torch.linalg.eigh((B + B.T) / 2)
    vals, vecs = vals.flip(0), vecs.flip(1)  # descending
    k = min(dim, N)
    coords = vecs[:, :k] * vals[:k].clamp_min(0).sqrt()
    if k < dim:
        coords = torch.cat([coords, torch.zeros(N, dim - k, dtype=torch.float64)], 1)
    return coords, vals


def plot_head_embedding(coords: Tensor, num_heads: int, path: str | Path | None = None, ax=None,
                        title: str = "heads by Jensen-Shannon distance (classical MDS)", labels: bool | None = None):
    """Scatter of the 2-D head embedding, coloured by layer (colour bar), points labelled ``layer.head``.

    ``coords``: ``(L * num_heads, 2)`` in layer-major order. ``labels``: None labels up to 120 heads. Draws on
    ``ax`` if given, else a new figure; with ``path`` saves a PNG (Agg backend) and returns the path, else
    returns the figure."""
    if coords.dim() != 2 or coords.shape[1] < 2 or num_heads < 1 or coords.shape[0] % num_heads:
        raise ValueError(f"coords must be (layers * {num_heads}, 2), got {tuple(coords.shape)}")
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = coords.shape[0]
    L = N // num_heads
    labels = N <= 120 if labels is None else labels
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 5.5))
    xy = coords[:, :2].detach().double().cpu()
    layer_of = torch.arange(L).repeat_interleave(num_heads)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=layer_of, cmap="viridis", vmin=0, vmax=max(L - 1, 1), s=26)
    if labels:
        for i in range(N):
            ax.annotate(f"{i // num_heads}.{i % num_heads}", (float(xy[i, 0]), float(xy[i, 1])), fontsize=6,
                        alpha=0.8)
    ax.figure.colorbar(sc, ax=ax, label="layer")
    ax.set_title(title, fontsize=10)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (fig or ax.figure).savefig(path, dpi=130, bbox_inches="tight")
        if fig is not None:
            plt.close(fig)
        return path
    return fig or ax.figure


# ---------------------------------------------------------------------------------------------------------
# on a model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EncoderAnalysis:
    """Clark et al.'s analyses of one model on a set of texts.

    ``attention[kind]``: ``(L, H)`` mean attention (``KINDS``); ``distance``: ``(L*H, L*H)`` JS distances
    (layer-major: head ``h`` of layer ``l`` is row ``l * H + h``); ``coords``: ``(L*H, 2)`` MDS embedding;
    ``eigenvalues``: the MDS spectrum; ``tokens``: query tokens averaged over; ``is_causal``.
    """

    attention: dict[str, Tensor]
    distance: Tensor
    coords: Tensor
    eigenvalues: Tensor
    num_layers: int
    num_heads: int
    tokens: int
    is_causal: bool

    def top(self, kind: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the most attention to ``kind``: ``(layer, head, value)``."""
        a = self.attention[kind].nan_to_num(float("-inf")).flatten()
        idx = a.argsort(descending=True)[:k]
        return [(int(i) // self.num_heads, int(i) % self.num_heads, float(a[i])) for i in idx]

    def layer_distance(self) -> tuple[float, float]:
        """Mean distance between heads of the same layer, and of different layers (the paper: heads of a
        layer behave alike)."""
        lay = torch.arange(self.num_layers).repeat_interleave(self.num_heads)
        same = (lay.view(-1, 1) == lay.view(1, -1)) & ~torch.eye(len(lay), dtype=torch.bool)
        diff = lay.view(-1, 1) != lay.view(1, -1)
        return float(self.distance[same].mean()), float(self.distance[diff].mean())

    def plot(self, path: str | Path | None = None, **kw):
        return plot_head_embedding(self.coords, self.num_heads, path, **kw)


def encoder_analysis(model: nn.Module, tok, texts: Sequence[str | tuple[str, str]] | None = None,
                     sqrt: bool = False, max_tokens: int = 128) -> EncoderAnalysis:
    """Run ``model`` on ``texts`` (default ``TEXTS``) one at a time and compute every analysis.

    Works on encoders (BERT: [CLS]/[SEP]) and decoders (BOS/EOS, see ``encode``); whatever attention runs in
    ``model`` (its own, an op, a plan) is measured. Texts are cut to ``max_tokens``.
    """
    texts = list(TEXTS if texts is None else texts)
    if not texts:
        raise ValueError("encoder_analysis needs at least one text")
    geo = hf.geometry(model)
    L, H = geo.num_layers, geo.num_heads
    encs = []
    for item in texts:
        e = encode(tok, item)
        e = {k: v[:max_tokens] for k, v in e.items()}
        if len(e["input_ids"]) < 2:
            raise ValueError(f"text {item!r} has fewer than 2 tokens")
        encs.append(e)
    B, T = len(encs), max(len(e["input_ids"]) for e in encs)
    maps = torch.zeros(L, B, H, T, T)
    valid = torch.zeros(B, T, dtype=torch.bool)
    kinds = {k: torch.zeros(B, T, dtype=torch.bool) for k in ("cls", "sep", "punct")}
    for b, e in enumerate(encs):
        ids = torch.tensor([e["input_ids"]])
        n = ids.shape[1]
        extra = {"token_type_ids": torch.tensor([e["token_type_ids"]])} if "token_type_ids" in e else {}
        kw = forward_kwargs(model, ids, **extra)  # no KV cache, one row of logits
        kw.pop("input_ids")
        _, store = hf.run_with_cache(model, ids, ["blocks.*.attn.weights"], rows=(0, n), **kw)
        for layer in range(L):
            maps[layer, b, :, :n, :n] = store[f"blocks.{layer}.attn.weights"][0].float()
        valid[b, :n] = True
        for k, m in token_kinds(tok, e["input_ids"]).items():
            kinds[k][b, :n] = m
    per_layer = [token_kind_attention(maps[layer], kinds, valid) for layer in range(L)]
    attention = {k: torch.stack([p[k] for p in per_layer]) for k in KINDS}
    # every head's distribution per valid query token: (L * H, R, T), keys zero-padded (JS ignores zeros)
    dists = torch.cat([maps[layer].permute(1, 0, 2, 3)[:, valid] for layer in range(L)])
    D = js_distances(dists, sqrt=sqrt)
    coords, vals = classical_mds(D, 2)
    return EncoderAnalysis(attention, D, coords, vals, L, H, int(valid.sum()), geo.is_causal)


__all__ = ["KINDS", "TEXTS", "EncoderAnalysis", "classical_mds", "encode", "encoder_analysis", "is_punctuation",
           "js_distances", "plot_head_embedding", "special_ids", "token_kind_attention", "token_kinds"]
