// attnlab's block-sparse attention for CPU: forward and backward over a BlockLayout.
//
// Layout (see src/attnlab/core/sparse/layout.py): per (batch or 1, query head or 1, query block g) the key
// blocks kv_index[.., g, :kv_count] to visit; full[..] marks blocks where every pair is allowed (no mask
// work), bits[.., n, q_block, k_block] is the exact mask of the others.
//
// Forward: flash-style online softmax per query tile; K and V are read in place (grouped-query attention maps
// query head h to key/value head h / (Hq / Hkv), nothing is repeated). Backward recomputes the tiles: dQ per
// query tile over its key blocks, dK/dV per key tile over the transposed lists (the query tiles that visit
// it), so every output element has one writer and no atomics are needed.
//
// Scores: s = scale * temperature[h] * (q . k); s = softcap * tanh(s / softcap); s += bias[b, h, i, j]
//         - alibi[h] * |q_pos - k_pos|; masked pairs are -inf. Rows seeing no key give 0 and lse -inf.
// fp32 and bf16 inputs; every product and accumulation is fp32.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------
// Tile products. C[M, N] (ldc) = (acc ? C : 0) + A[M, K] (lda) @ B[K, N] (ldb); row-major fp32.
// Two engines: oneDNN's batch-reduce GEMM shipped with torch (cpublas::brgemm) and our own register-blocked
// kernel on ATen's Vectorized<float>; which one runs is a measured choice (set_gemm).

int g_gemm = 0;  // 0: own micro-kernel, 1: cpublas::brgemm

template <int MR, int NV>
inline void mm_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     bool acc, int64_t ntail) {
  // MR rows x NV vectors of C; the last vector holds ntail (<= vector size) columns.
  constexpr int V = fVec::size();
  fVec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      int64_t cnt = (j == NV - 1) ? ntail : V;
      c[r][j] = acc ? fVec::loadu(C + r * ldc + j * V, cnt) : fVec(0.f);
    }
  for (int64_t k = 0; k < K; ++k) {
    fVec b[NV];
    for (int j = 0; j < NV; ++j) {
      int64_t cnt = (j == NV - 1) ? ntail : V;
      b[j] = cnt == V ? fVec::loadu(B + k * ldb + j * V) : fVec::loadu(B + k * ldb + j * V, cnt);
    }
    for (int r = 0; r < MR; ++r) {
      fVec a(A[r * lda + k]);
      for (int j = 0; j < NV; ++j) c[r][j] = at::vec::fmadd(a, b[j], c[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      int64_t cnt = (j == NV - 1) ? ntail : V;
      c[r][j].store(C + r * ldc + j * V, cnt);
    }
}

template <int NV>
inline void mm_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc, bool acc, int64_t ntail) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) mm_block<4, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, acc, ntail);
  for (; m < M; ++m) mm_block<1, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, acc, ntail);
}

void mm_own(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
            int64_t ldc, bool acc) {
  constexpr int V = fVec::size();
  int64_t n = 0;
  for (; n + 4 * V <= N; n += 4 * V) mm_rows<4>(M, K, A, lda, B + n, ldb, C + n, ldc, acc, V);
  int64_t rest = N - n;
  if (rest <= 0) return;
  int64_t nv = (rest + V - 1) / V, tail = rest - (nv - 1) * V;
  switch (nv) {
    case 1: mm_rows<1>(M, K, A, lda, B + n, ldb, C + n, ldc, acc, tail); break;
    case 2: mm_rows<2>(M, K, A, lda, B + n, ldb, C + n, ldc, acc, tail); break;
    case 3: mm_rows<3>(M, K, A, lda, B + n, ldb, C + n, ldc, acc, tail); break;
    default: mm_rows<4>(M, K, A, lda, B + n, ldb, C + n, ldc, acc, tail); break;
  }
}

inline void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!acc)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (g_gemm == 1) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, acc, A, B, C, false);
    return;
  }
#endif
  {
    mm_own(M, N, K, A, lda, B, ldb, C, ldc, acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Loading tiles as fp32: in place for fp32 inputs, converted into scratch for bf16.

template <typename T>
inline const float* rows_f32(const T* src, int64_t rows, int64_t cols, int64_t stride, float* scratch,
                             int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    ld = stride;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) scratch[r * cols + c] = static_cast<float>(src[r * stride + c]);
    ld = cols;
    return scratch;
  }
}

// dst[c, r] = src[r, c] for a (rows, cols) tile; dst has leading dimension ldd.
template <typename T>
inline void transpose_f32(const T* src, int64_t rows, int64_t cols, int64_t stride, float* dst, int64_t ldd) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, stride, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = static_cast<float>(s[c]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Parameters shared by forward and backward.

struct Mods {
  const float* bias = nullptr;  // (Bb, Hb, Tq, Tk) fp32 contiguous
  int64_t bias_B = 1, bias_H = 1;
  const float* alibi = nullptr;  // (Hq,)
  const float* temp = nullptr;   // (Hq,)
  float softcap = 0.f;           // 0: none
  bool any_elementwise() const { return bias || alibi || softcap > 0.f; }
};

struct Geo {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dv, qb, kb, q_offset, Gq, Gk, Bp, Hp, N;
  float scale;
  // Optional orders: layout query row r is physical row qperm[r], layout key j is physical key kperm[j]
  // (rows are read and written through them: no permuted copies).
  const int32_t* qperm = nullptr;
  const int32_t* kperm = nullptr;
  int64_t qrow(int64_t r) const { return qperm ? qperm[r] : r; }
  int64_t krow(int64_t j) const { return kperm ? kperm[j] : j; }
};

// Rows r < rows of a tile: source row idx[r] (idx null: first + r), converted to fp32 (times mul) into dst
// with leading dimension cols.
template <typename T>
inline void gather_rows(const T* base, int64_t stride, const int32_t* idx, int64_t first, int64_t rows,
                        int64_t cols, float* dst, float mul = 1.f) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + (idx ? idx[first + r] : first + r) * stride;
    float* d = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(src[c]) * mul;
  }
}

// A tile of rows as fp32: in place when possible (fp32, consecutive rows), else gathered into scratch.
template <typename T>
inline const float* tile_rows(const T* base, int64_t stride, const int32_t* idx, int64_t first, int64_t rows,
                              int64_t cols, float* scratch, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (!idx) {
      ld = stride;
      return base + first * stride;
    }
  }
  gather_rows(base, stride, idx, first, rows, cols, scratch);
  ld = cols;
  return scratch;
}

// Transposed tile (cols x rows, leading dimension ldd) of rows gathered as above; tmp holds rows x cols.
template <typename T>
inline void tile_transposed(const T* base, int64_t stride, const int32_t* idx, int64_t first, int64_t rows,
                            int64_t cols, float* dst, int64_t ldd, float* tmp) {
  if (!idx) {
    transpose_f32(base + first * stride, rows, cols, stride, dst, ldd);
    return;
  }
  gather_rows(base, stride, idx, first, rows, cols, tmp);
  transpose_f32<float>(tmp, rows, cols, cols, dst, ldd);
}

// s[c] = -inf where bits[c * bstride] is false (a partial block's mask row).
inline void apply_bits(float* s, int64_t kn, const bool* bits, int64_t bstride) {
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(CPU_CAPABILITY_AVX512)
  if (bstride == 1) {
    const __m512 ninf = _mm512_set1_ps(NEG_INF);
    for (; c + 16 <= kn; c += 16) {
      __mmask16 ok = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + c)),
                                        _mm_set1_epi8(1));
      _mm512_storeu_ps(s + c, _mm512_mask_mov_ps(ninf, ok, _mm512_loadu_ps(s + c)));
    }
  }
#endif
  for (; c < kn; ++c)
    if (!bits[c * bstride]) s[c] = NEG_INF;
}

// Turn raw products s[0..kn) of query row i (physical row, absolute position q_pos) against keys into final
// scores, masked. Key c of the tile is physical key kidx[c] (kidx null: j0 + c). bits: the row of the block's
// mask (nullptr for a full block).
inline void finish_scores(float* s, int64_t kn, float smul, const Mods& md, int64_t b, int64_t h, int64_t i,
                          int64_t q_pos, int64_t j0, const int32_t* kidx, int64_t Tq, int64_t Tk,
                          const bool* bits) {
  constexpr int V = fVec::size();
  int64_t c = 0;
  if (smul != 1.f) {
    fVec vm(smul);
    for (; c + V <= kn; c += V) (fVec::loadu(s + c) * vm).store(s + c);
    for (; c < kn; ++c) s[c] *= smul;
  }
  if (md.softcap > 0.f) {
    float cap = md.softcap, inv = 1.f / md.softcap;
    for (c = 0; c < kn; ++c) s[c] = cap * std::tanh(s[c] * inv);
  }
  if (md.bias) {
    const float* br = md.bias + (((md.bias_B > 1 ? b : 0) * md.bias_H + (md.bias_H > 1 ? h : 0)) * Tq + i) * Tk;
    for (c = 0; c < kn; ++c) s[c] += br[kidx ? kidx[c] : j0 + c];
  }
  if (md.alibi) {
    float sl = md.alibi[h];
    for (c = 0; c < kn; ++c) s[c] -= sl * std::fabs(static_cast<float>(q_pos - (kidx ? kidx[c] : j0 + c)));
  }
  if (bits) apply_bits(s, kn, bits, 1);
}

// Derivative of the soft-cap at the raw product, times the scale: d s_final / d raw.
inline float raw_grad_factor(float raw, float smul, float softcap) {
  if (softcap <= 0.f) return smul;
  float t = std::tanh(raw * smul / softcap);
  return smul * (1.f - t * t);
}

inline float vec_max(const float* s, int64_t n) {
  constexpr int V = fVec::size();
  int64_t c = 0;
  float m = NEG_INF;
  if (n >= V) {
    fVec vm = fVec::loadu(s);
    for (c = V; c + V <= n; c += V) vm = at::vec::maximum(vm, fVec::loadu(s + c));
    m = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, s[c]);
  return m;
}

// s <- exp(s - m); returns the sum.
inline float vec_exp_sum(float* s, int64_t n, float m) {
  constexpr int V = fVec::size();
  int64_t c = 0;
  fVec vm(m), acc(0.f);
  for (; c + V <= n; c += V) {
    fVec e = (fVec::loadu(s + c) - vm).exp_u20();
    e.store(s + c);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc);
  if (c < n) {
    fVec e = (fVec::loadu(s + c, n - c) - vm).exp_u20();
    e.store(s + c, n - c);
    float tmp[V];
    e.store(tmp, n - c);
    for (int64_t t = 0; t < n - c; ++t) sum += tmp[t];
  }
  return sum;
}

inline void vec_scale(float* x, int64_t n, float a) {
  constexpr int V = fVec::size();
  int64_t c = 0;
  fVec va(a);
  for (; c + V <= n; c += V) (fVec::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// Work items sorted by decreasing cost, handed out dynamically: uneven rows (causal, sinks, routing) balance.
template <typename F>
void run_balanced(const std::vector<int64_t>& cost, F&& fn) {
  int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    while (true) {
      int64_t t = next.fetch_add(1);
      if (t >= n) break;
      fn(order[t]);
    }
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if (g_gemm == 1) at::native::cpublas::brgemm_release(false);
#endif
  });
}

struct LayoutView {
  const int32_t* kv_index;
  const int32_t* kv_count;
  const bool* full;
  const bool* bits;  // may be null
};

Geo make_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_index,
             int64_t qb, int64_t kb, int64_t q_offset, double scale) {
  Geo g;
  g.B = q.size(0); g.Hq = q.size(1); g.Tq = q.size(2); g.D = q.size(3);
  g.Hkv = k.size(1); g.Tk = k.size(2); g.Dv = v.size(3);
  g.qb = qb; g.kb = kb; g.q_offset = q_offset; g.scale = static_cast<float>(scale);
  g.Bp = kv_index.size(0); g.Hp = kv_index.size(1); g.Gq = kv_index.size(2); g.N = kv_index.size(3);
  g.Gk = (g.Tk + kb - 1) / kb;
  TORCH_CHECK(g.Hq % g.Hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(g.Gq == (g.Tq + qb - 1) / qb, "layout has ", g.Gq, " query blocks, expected ceil(q_len / q_block)");
  TORCH_CHECK(g.Bp == 1 || g.Bp == g.B, "layout batch must be 1 or the batch");
  TORCH_CHECK(g.Hp == 1 || g.Hp == g.Hq, "layout heads must be 1 or the number of query heads");
  return g;
}

Mods make_mods(const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& alibi, double softcap,
               const c10::optional<at::Tensor>& temp) {
  Mods m;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 4, "bias: fp32 4-D contiguous");
    m.bias = bias->data_ptr<float>();
    m.bias_B = bias->size(0);
    m.bias_H = bias->size(1);
  }
  if (alibi && alibi->defined()) m.alibi = alibi->data_ptr<float>();
  if (temp && temp->defined()) m.temp = temp->data_ptr<float>();
  m.softcap = static_cast<float>(softcap);
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const LayoutView& L, const Geo& G,
                  const Mods& md, at::Tensor& out, at::Tensor& lse) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t rep = G.Hq / G.Hkv;
  const int64_t qb = G.qb, kb = G.kb, D = G.D, Dv = G.Dv;

  std::vector<int64_t> cost(G.B * G.Hq * G.Gq);
  for (int64_t b = 0; b < G.B; ++b)
    for (int64_t h = 0; h < G.Hq; ++h)
      for (int64_t g = 0; g < G.Gq; ++g) {
        int64_t lb = ((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0)) * G.Gq + g;
        cost[(b * G.Hq + h) * G.Gq + g] = L.kv_count[lb];
      }

  run_balanced(cost, [&](int64_t item) {
    thread_local std::vector<float> buf;
    const int64_t need = qb * D + D * kb + qb * kb + qb * Dv + kb * Dv + 2 * qb + kb * D;
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
    float* Qs = buf.data();
    float* KT = Qs + qb * D;
    float* S = KT + D * kb;
    float* O = S + qb * kb;
    float* Vs = O + qb * Dv;
    float* mrow = Vs + kb * Dv;
    float* lrow = mrow + qb;
    float* Kg = lrow + qb;

    const int64_t g = item % G.Gq, h = (item / G.Gq) % G.Hq, b = item / (G.Gq * G.Hq);
    const int64_t hk = h / rep;
    const int64_t lb = ((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0)) * G.Gq + g;
    const int64_t i0 = g * qb, qn = std::min(qb, G.Tq - i0);
    const float smul = G.scale * (md.temp ? md.temp[h] : 1.f);
    // Q scaled once per tile (scale * temperature), so full blocks without modifiers need no pass over S
    gather_rows(qp + b * qs0 + h * qs1, qs2, G.qperm, i0, qn, D, Qs, smul);
    for (int64_t i = 0; i < qn; ++i) { mrow[i] = NEG_INF; lrow[i] = 0.f; }
    std::fill(O, O + qn * Dv, 0.f);
    const T* kbase = kp + b * ks0 + hk * ks1;
    const T* vbase = vp + b * vs0 + hk * vs1;
    const int64_t cnt = L.kv_count[lb];
    for (int64_t n = 0; n < cnt; ++n) {
      const int64_t e = lb * G.N + n;
      const int64_t j0 = static_cast<int64_t>(L.kv_index[e]) * kb, kn = std::min(kb, G.Tk - j0);
      if (kn <= 0) continue;
      const bool* bits = (L.full[e] || !L.bits) ? nullptr : L.bits + e * qb * kb;
      tile_transposed(kbase, ks2, G.kperm, j0, kn, D, KT, kb, Kg);
      mm(qn, kn, D, Qs, D, KT, kb, S, kb, false);
      for (int64_t i = 0; i < qn; ++i) {
        float* s = S + i * kb;
        if (md.any_elementwise())
          finish_scores(s, kn, 1.f, md, b, h, G.qrow(i0 + i), G.q_offset + G.qrow(i0 + i), j0,
                        G.kperm ? G.kperm + j0 : nullptr, G.Tq, G.Tk, bits ? bits + i * kb : nullptr);
        else if (bits)
          apply_bits(s, kn, bits + i * kb, 1);
        float mx = vec_max(s, kn);
        float mnew = std::max(mrow[i], mx);
        if (mnew == NEG_INF) {  // nothing visible yet in this row
          std::fill(s, s + kn, 0.f);
          continue;
        }
        float alpha = mrow[i] == NEG_INF ? 0.f : std::exp(mrow[i] - mnew);
        float sum = vec_exp_sum(s, kn, mnew);
        lrow[i] = lrow[i] * alpha + sum;
        mrow[i] = mnew;
        if (alpha != 1.f) vec_scale(O + i * Dv, Dv, alpha);
      }
      int64_t ldv;
      const float* Vt = tile_rows(vbase, vs2, G.kperm, j0, kn, Dv, Vs, ldv);
      mm(qn, Dv, kn, S, kb, Vt, ldv, O, Dv, true);
    }
    for (int64_t i = 0; i < qn; ++i) {
      const int64_t row = (b * G.Hq + h) * G.Tq + G.qrow(i0 + i);
      T* orow = op + row * Dv;
      if (lrow[i] > 0.f) {
        float inv = 1.f / lrow[i];
        for (int64_t c = 0; c < Dv; ++c) orow[c] = static_cast<T>(O[i * Dv + c] * inv);
        lp[row] = mrow[i] + std::log(lrow[i]);
      } else {
        for (int64_t c = 0; c < Dv; ++c) orow[c] = static_cast<T>(0.f);
        lp[row] = NEG_INF;
      }
    }
  });
}

LayoutView layout_view(const at::Tensor& kv_index, const at::Tensor& kv_count, const at::Tensor& full,
                       const c10::optional<at::Tensor>& bits, int64_t qb, int64_t kb) {
  TORCH_CHECK(kv_index.scalar_type() == at::kInt && kv_index.is_contiguous() && kv_index.dim() == 4, "kv_index: int32 (Bp, Hp, Gq, N) contiguous");
  TORCH_CHECK(kv_count.scalar_type() == at::kInt && kv_count.is_contiguous(), "kv_count: int32 contiguous");
  TORCH_CHECK(full.scalar_type() == at::kBool && full.is_contiguous() && full.sizes() == kv_index.sizes(), "full: bool like kv_index");
  LayoutView L{kv_index.data_ptr<int32_t>(), kv_count.data_ptr<int32_t>(), full.data_ptr<bool>(), nullptr};
  if (bits && bits->defined()) {
    TORCH_CHECK(bits->scalar_type() == at::kBool && bits->is_contiguous() && bits->dim() == 6 &&
                    bits->size(4) == qb && bits->size(5) == kb && bits->size(3) == kv_index.size(3),
                "bits: bool (Bp, Hp, Gq, N, q_block, k_block) contiguous");
    L.bits = bits->data_ptr<bool>();
  }
  return L;
}

// Optional row orders (a permutation each, int32); sets G.qperm / G.kperm.
void set_orders(Geo& G, const c10::optional<at::Tensor>& q_order, const c10::optional<at::Tensor>& k_order) {
  auto check = [](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 1 && t.size(0) == n, name,
                " must be a contiguous int32 vector of length ", n);
    std::vector<char> seen(n, 0);
    const int32_t* p = t.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < n && !seen[p[i]], name, " must be a permutation of 0..", n - 1);
      seen[p[i]] = 1;
    }
    return p;
  };
  if (q_order && q_order->defined()) G.qperm = check(*q_order, G.Tq, "q_order");
  if (k_order && k_order->defined()) G.kperm = check(*k_order, G.Tk, "k_order");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (batch, heads, seq, head_dim)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "last dimension must be contiguous");
  TORCH_CHECK(k.size(2) == v.size(2) && k.size(1) == v.size(1) && q.size(3) == k.size(3), "q, k, v shapes disagree");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_index, const at::Tensor& kv_count, const at::Tensor& full,
                                const c10::optional<at::Tensor>& bits, int64_t q_block, int64_t k_block,
                                int64_t q_offset, double scale, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& alibi, double softcap,
                                const c10::optional<at::Tensor>& temperature,
                                const c10::optional<at::Tensor>& q_order, const c10::optional<at::Tensor>& k_order) {
  check_qkv(q, k, v);
  Geo G = make_geo(q, k, v, kv_index, q_block, k_block, q_offset, scale);
  set_orders(G, q_order, k_order);
  LayoutView L = layout_view(kv_index, kv_count, full, bits, q_block, k_block);
  Mods md = make_mods(bias, alibi, softcap, temperature);
  auto out = at::empty({G.B, G.Hq, G.Tq, G.Dv}, q.options());
  auto lse = at::empty({G.B, G.Hq, G.Tq}, q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kFloat) {
    forward_impl<float>(q, k, v, L, G, md, out, lse);
  } else if (q.scalar_type() == at::kBFloat16) {
    forward_impl<at::BFloat16>(q, k, v, L, G, md, out, lse);
  } else {
    TORCH_CHECK(false, "block_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// Transposed block lists: per (Bp, Hp, key block), the (query block, slot n) pairs that visit it.

std::vector<at::Tensor> transpose_layout(const at::Tensor& kv_index, const at::Tensor& kv_count, int64_t Gk) {
  const int64_t Bp = kv_index.size(0), Hp = kv_index.size(1), Gq = kv_index.size(2), N = kv_index.size(3);
  const int32_t* idx = kv_index.data_ptr<int32_t>();
  const int32_t* cnt = kv_count.data_ptr<int32_t>();
  std::vector<int32_t> counts(Bp * Hp * Gk, 0);
  for (int64_t p = 0; p < Bp * Hp; ++p)
    for (int64_t g = 0; g < Gq; ++g)
      for (int64_t n = 0; n < cnt[p * Gq + g]; ++n) {
        int32_t j = idx[(p * Gq + g) * N + n];
        TORCH_CHECK(j >= 0 && j < Gk, "kv_index entry ", j, " out of range [0, ", Gk, ")");
        counts[p * Gk + j]++;
      }
  int64_t M = std::max<int64_t>(1, *std::max_element(counts.begin(), counts.end()));
  auto opts = kv_index.options();
  auto q_index = at::zeros({Bp, Hp, Gk, M}, opts);
  auto q_slot = at::zeros({Bp, Hp, Gk, M}, opts);
  auto q_count = at::zeros({Bp, Hp, Gk}, opts);
  int32_t* qi = q_index.data_ptr<int32_t>();
  int32_t* qs = q_slot.data_ptr<int32_t>();
  int32_t* qc = q_count.data_ptr<int32_t>();
  for (int64_t p = 0; p < Bp * Hp; ++p)
    for (int64_t g = 0; g < Gq; ++g)
      for (int64_t n = 0; n < cnt[p * Gq + g]; ++n) {
        int64_t j = idx[(p * Gq + g) * N + n];
        int64_t at_ = p * Gk + j;
        int32_t c = qc[at_]++;
        qi[at_ * M + c] = static_cast<int32_t>(g);
        qs[at_ * M + c] = static_cast<int32_t>(n);
      }
  return {q_index, q_slot, q_count};
}

// ---------------------------------------------------------------------------------------------------------
// Backward

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const float* lse, const float* delta, const LayoutView& L, const int32_t* qt_index,
                   const int32_t* qt_slot, const int32_t* qt_count, int64_t M, const Geo& G, const Mods& md,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float* dbias, float* dtemp_part) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();  // contiguous (B, Hq, Tq, Dv)
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t rep = G.Hq / G.Hkv;
  const int64_t qb = G.qb, kb = G.kb, D = G.D, Dv = G.Dv;
  const float POS_INF = std::numeric_limits<float>::infinity();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();

  // ---- dQ: per query tile over its key blocks.
  std::vector<int64_t> cost(G.B * G.Hq * G.Gq);
  for (int64_t b = 0; b < G.B; ++b)
    for (int64_t h = 0; h < G.Hq; ++h)
      for (int64_t g = 0; g < G.Gq; ++g)
        cost[(b * G.Hq + h) * G.Gq + g] = L.kv_count[((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0)) * G.Gq + g];

  run_balanced(cost, [&](int64_t item) {
    thread_local std::vector<float> buf;
    const int64_t need = qb * D + qb * Dv + D * kb + Dv * kb + 3 * qb * kb + qb * D + kb * std::max(D, Dv) + 2 * qb;
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
    float* Qs = buf.data();
    float* dOs = Qs + qb * D;
    float* KT = dOs + qb * Dv;
    float* VT = KT + D * kb;
    float* S = VT + Dv * kb;   // raw products
    float* P = S + qb * kb;    // scores, then probabilities
    float* dP = P + qb * kb;   // dO V^T, then dS
    float* dQ = dP + qb * kb;
    float* Ks = dQ + qb * D;   // gathered K or V rows
    float* lse_t = Ks + kb * std::max(D, Dv);
    float* del_t = lse_t + qb;

    const int64_t g = item % G.Gq, h = (item / G.Gq) % G.Hq, b = item / (G.Gq * G.Hq);
    const int64_t hk = h / rep;
    const int64_t lb = ((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0)) * G.Gq + g;
    const int64_t i0 = g * qb, qn = std::min(qb, G.Tq - i0);
    const int64_t bh = (b * G.Hq + h) * G.Tq;
    const float smul = G.scale * (md.temp ? md.temp[h] : 1.f);
    int64_t ldq, lddo;
    const float* Q = tile_rows(qp + b * qs0 + h * qs1, qs2, G.qperm, i0, qn, D, Qs, ldq);
    const float* dO = tile_rows(dop + bh * Dv, Dv, G.qperm, i0, qn, Dv, dOs, lddo);
    for (int64_t i = 0; i < qn; ++i) {
      lse_t[i] = lse[bh + G.qrow(i0 + i)];
      del_t[i] = delta[bh + G.qrow(i0 + i)];
    }
    std::fill(dQ, dQ + qn * D, 0.f);
    double dtemp_acc = 0.0;
    const T* kbase = kp + b * ks0 + hk * ks1;
    const T* vbase = vp + b * vs0 + hk * vs1;
    const int64_t cnt = L.kv_count[lb];
    for (int64_t n = 0; n < cnt; ++n) {
      const int64_t e = lb * G.N + n;
      const int64_t j0 = static_cast<int64_t>(L.kv_index[e]) * kb, kn = std::min(kb, G.Tk - j0);
      if (kn <= 0) continue;
      const bool* bits = (L.full[e] || !L.bits) ? nullptr : L.bits + e * qb * kb;
      const int32_t* kidx = G.kperm ? G.kperm + j0 : nullptr;
      tile_transposed(kbase, ks2, G.kperm, j0, kn, D, KT, kb, Ks);
      tile_transposed(vbase, vs2, G.kperm, j0, kn, Dv, VT, kb, Ks);
      mm(qn, kn, D, Q, ldq, KT, kb, S, kb, false);
      mm(qn, kn, Dv, dO, lddo, VT, kb, dP, kb, false);
      for (int64_t i = 0; i < qn; ++i) {
        float* p = P + i * kb;
        const float* s = S + i * kb;
        float* dp = dP + i * kb;
        const float l = lse_t[i];
        if (l == NEG_INF) {
          std::fill(dp, dp + kn, 0.f);
          continue;
        }
        const int64_t irow = G.qrow(i0 + i);
        std::copy(s, s + kn, p);
        finish_scores(p, kn, smul, md, b, h, irow, G.q_offset + irow, j0, kidx, G.Tq, G.Tk,
                      bits ? bits + i * kb : nullptr);
        const float dl = del_t[i];
        // P = exp(s - lse) (masked: exp(-inf) = 0); dS = P * (dP - delta): the gradient of the final score
        {
          constexpr int V = fVec::size();
          const fVec vl(l), vd(dl);
          int64_t c = 0;
          for (; c + V <= kn; c += V) {
            fVec pv = (fVec::loadu(p + c) - vl).exp_u20();
            (pv * (fVec::loadu(dp + c) - vd)).store(dp + c);
          }
          if (c < kn) {
            fVec pv = (fVec::loadu(p + c, kn - c) - vl).exp_u20();
            (pv * (fVec::loadu(dp + c, kn - c) - vd)).store(dp + c, kn - c);
          }
        }
        if (dbias) {
          float* drow = dbias + (bh + irow) * G.Tk;
          for (int64_t c = 0; c < kn; ++c) drow[kidx ? kidx[c] : j0 + c] = dp[c];
        }
        if (md.softcap > 0.f || dtemp_part) {
          for (int64_t c = 0; c < kn; ++c) {
            const float f = raw_grad_factor(s[c], smul, md.softcap);  // d final / d raw
            if (dtemp_part) dtemp_acc += static_cast<double>(dp[c]) * (f / smul) * s[c];
            dp[c] *= f;
          }
        } else {
          vec_scale(dp, kn, smul);
        }
      }
      int64_t ldk;
      const float* Kt = tile_rows(kbase, ks2, G.kperm, j0, kn, D, Ks, ldk);
      mm(qn, D, kn, dP, kb, Kt, ldk, dQ, D, true);
    }
    T* dqb = dqp + bh * D;
    for (int64_t i = 0; i < qn; ++i) {
      T* out = dqb + G.qrow(i0 + i) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(dQ[i * D + d]);
    }
    if (dtemp_part) dtemp_part[item] = static_cast<float>(dtemp_acc * G.scale);
  });

  // ---- dK, dV: per (batch, kv head, key tile) over the query tiles of its group's heads that visit it.
  std::vector<int64_t> cost2(G.B * G.Hkv * G.Gk, 0);
  for (int64_t b = 0; b < G.B; ++b)
    for (int64_t hk = 0; hk < G.Hkv; ++hk)
      for (int64_t j = 0; j < G.Gk; ++j)
        for (int64_t h = hk * rep; h < (hk + 1) * rep; ++h)
          cost2[(b * G.Hkv + hk) * G.Gk + j] += qt_count[((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0)) * G.Gk + j];

  run_balanced(cost2, [&](int64_t item) {
    thread_local std::vector<float> buf;
    const int64_t need = kb * D + kb * Dv + D * qb + Dv * qb + 2 * kb * qb + kb * D + kb * Dv + qb * D + qb * Dv + 3 * qb;
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
    float* Ks = buf.data();
    float* Vs = Ks + kb * D;
    float* QT = Vs + kb * Dv;
    float* dOT = QT + D * qb;
    float* PT = dOT + Dv * qb;
    float* dPT = PT + kb * qb;
    float* dK = dPT + kb * qb;
    float* dV = dK + kb * D;
    float* Qs = dV + kb * Dv;
    float* dOs = Qs + qb * D;
    float* raw = dOs + qb * Dv;
    float* lfix = raw + qb;
    float* del_t = lfix + qb;

    const int64_t j = item % G.Gk, hk = (item / G.Gk) % G.Hkv, b = item / (G.Gk * G.Hkv);
    const int64_t j0 = j * kb, kn = std::min(kb, G.Tk - j0);
    const int32_t* kidx = G.kperm ? G.kperm + j0 : nullptr;
    int64_t ldk, ldv;
    const float* K = tile_rows(kp + b * ks0 + hk * ks1, ks2, G.kperm, j0, kn, D, Ks, ldk);
    const float* V = tile_rows(vp + b * vs0 + hk * vs1, vs2, G.kperm, j0, kn, Dv, Vs, ldv);
    std::fill(dK, dK + kn * D, 0.f);
    std::fill(dV, dV + kn * Dv, 0.f);
    for (int64_t h = hk * rep; h < (hk + 1) * rep; ++h) {
      const int64_t pb = ((G.Bp > 1 ? b : 0) * G.Hp + (G.Hp > 1 ? h : 0));
      const int64_t tb = pb * G.Gk + j;
      const int64_t bh = (b * G.Hq + h) * G.Tq;
      const float smul = G.scale * (md.temp ? md.temp[h] : 1.f);
      for (int64_t m = 0; m < qt_count[tb]; ++m) {
        const int64_t g = qt_index[tb * M + m], n = qt_slot[tb * M + m];
        const int64_t e = (pb * G.Gq + g) * G.N + n;
        const bool* bits = (L.full[e] || !L.bits) ? nullptr : L.bits + e * qb * kb;
        const int64_t i0 = g * qb, qn = std::min(qb, G.Tq - i0);
        int64_t ldq, lddo;
        const float* Q = tile_rows(qp + b * qs0 + h * qs1, qs2, G.qperm, i0, qn, D, Qs, ldq);
        const float* dO = tile_rows(dop + bh * Dv, Dv, G.qperm, i0, qn, Dv, dOs, lddo);
        transpose_f32<float>(Q, qn, D, ldq, QT, qb);
        transpose_f32<float>(dO, qn, Dv, lddo, dOT, qb);
        mm(kn, qn, D, K, ldk, QT, qb, PT, qb, false);     // raw S^T
        mm(kn, qn, Dv, V, ldv, dOT, qb, dPT, qb, false);  // dP^T
        // rows of lse with -inf (queries seeing nothing) become +inf so that exp(s - lse) = 0 there
        for (int64_t i = 0; i < qn; ++i) {
          const int64_t r = bh + G.qrow(i0 + i);
          lfix[i] = lse[r] == NEG_INF ? POS_INF : lse[r];
          del_t[i] = delta[r];
        }
        const bool elementwise = md.any_elementwise();
        for (int64_t c = 0; c < kn; ++c) {
          float* p = PT + c * qb;  // raw products of key c with every query row of the tile
          float* dp = dPT + c * qb;
          const int64_t kpos = kidx ? kidx[c] : j0 + c;
          if (md.softcap > 0.f) std::copy(p, p + qn, raw);
          if (elementwise) {
            for (int64_t i = 0; i < qn; ++i) {
              const int64_t irow = G.qrow(i0 + i);
              float sv = p[i] * smul;
              if (md.softcap > 0.f) sv = md.softcap * std::tanh(sv / md.softcap);
              if (md.bias)
                sv += md.bias[(((md.bias_B > 1 ? b : 0) * md.bias_H + (md.bias_H > 1 ? h : 0)) * G.Tq + irow) * G.Tk + kpos];
              if (md.alibi) sv -= md.alibi[h] * std::fabs(static_cast<float>(G.q_offset + irow - kpos));
              p[i] = sv;
            }
          } else {
            vec_scale(p, qn, smul);
          }
          if (bits)
            for (int64_t i = 0; i < qn; ++i)
              if (!bits[i * kb + c]) p[i] = NEG_INF;
          constexpr int V = fVec::size();
          int64_t i = 0;
          for (; i + V <= qn; i += V) {
            fVec pv = (fVec::loadu(p + i) - fVec::loadu(lfix + i)).exp_u20();
            pv.store(p + i);
            (pv * (fVec::loadu(dp + i) - fVec::loadu(del_t + i))).store(dp + i);
          }
          if (i < qn) {
            int64_t r = qn - i;
            fVec pv = (fVec::loadu(p + i, r) - fVec::loadu(lfix + i, r)).exp_u20();
            pv.store(p + i, r);
            (pv * (fVec::loadu(dp + i, r) - fVec::loadu(del_t + i, r))).store(dp + i, r);
          }
          if (md.softcap > 0.f) {
            for (int64_t t = 0; t < qn; ++t) dp[t] *= raw_grad_factor(raw[t], smul, md.softcap);
          } else {
            vec_scale(dp, qn, smul);
          }
        }
        mm(kn, Dv, qn, PT, qb, dO, lddo, dV, Dv, true);
        mm(kn, D, qn, dPT, qb, Q, ldq, dK, D, true);
      }
    }
    T* dkb = dkp + (b * G.Hkv + hk) * G.Tk * D;
    T* dvb = dvp + (b * G.Hkv + hk) * G.Tk * Dv;
    for (int64_t c = 0; c < kn; ++c) {
      const int64_t r = kidx ? kidx[c] : j0 + c;
      for (int64_t d = 0; d < D; ++d) dkb[r * D + d] = static_cast<T>(dK[c * D + d]);
      for (int64_t d = 0; d < Dv; ++d) dvb[r * Dv + d] = static_cast<T>(dV[c * Dv + d]);
    }
  });
}

std::vector<at::Tensor> backward(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const c10::optional<at::Tensor>& dlse, const at::Tensor& kv_index,
                                 const at::Tensor& kv_count, const at::Tensor& full,
                                 const c10::optional<at::Tensor>& bits, const at::Tensor& qt_index,
                                 const at::Tensor& qt_slot, const at::Tensor& qt_count, int64_t q_block,
                                 int64_t k_block, int64_t q_offset, double scale,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& alibi,
                                 double softcap, const c10::optional<at::Tensor>& temperature, bool need_dbias,
                                 bool need_dtemp, const c10::optional<at::Tensor>& q_order,
                                 const c10::optional<at::Tensor>& k_order) {
  check_qkv(q, k, v);
  Geo G = make_geo(q, k, v, kv_index, q_block, k_block, q_offset, scale);
  set_orders(G, q_order, k_order);
  LayoutView L = layout_view(kv_index, kv_count, full, bits, q_block, k_block);
  Mods md = make_mods(bias, alibi, softcap, temperature);
  TORCH_CHECK(qt_index.size(2) == G.Gk, "transposed lists must have one row per key block");
  auto dout = dout_in.to(q.scalar_type()).contiguous();
  auto outc = out.contiguous();
  auto lsec = lse.contiguous();
  // delta_i = <dO_i, O_i> - dlse_i: the row term of the softmax gradient (dlse flows in through P as well)
  // computed row by row: no (B, Hq, Tq, Dv) temporary
  auto delta = at::empty({G.B, G.Hq, G.Tq}, q.options().dtype(at::kFloat));
  {
    at::Tensor dl;
    if (dlse && dlse->defined()) dl = dlse->to(at::kFloat).contiguous();
    const float* dlp = dl.defined() ? dl.data_ptr<float>() : nullptr;
    float* dp = delta.data_ptr<float>();
    const int64_t Dv = G.Dv;
    auto rowdot = [&](auto tag) {
      using T = decltype(tag);
      const T* a = dout.data_ptr<T>();
      const T* o = outc.data_ptr<T>();
      at::parallel_for(0, G.B * G.Hq * G.Tq, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float acc = 0.f;
          for (int64_t c = 0; c < Dv; ++c) acc += static_cast<float>(a[r * Dv + c]) * static_cast<float>(o[r * Dv + c]);
          dp[r] = acc - (dlp ? dlp[r] : 0.f);
        }
      });
    };
    if (q.scalar_type() == at::kFloat) rowdot(float{}); else rowdot(at::BFloat16{});
  }
  auto dq = at::empty({G.B, G.Hq, G.Tq, G.D}, q.options());
  auto dk = at::empty({G.B, G.Hkv, G.Tk, G.D}, q.options());
  auto dv = at::empty({G.B, G.Hkv, G.Tk, G.Dv}, q.options());
  at::Tensor dbias, dtemp;
  if (need_dbias) dbias = at::zeros({G.B, G.Hq, G.Tq, G.Tk}, q.options().dtype(at::kFloat));
  if (need_dtemp) dtemp = at::zeros({G.B, G.Hq, G.Gq}, q.options().dtype(at::kFloat));
  const int64_t M = qt_index.size(3);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(dout, q, k, v, lsec.data_ptr<float>(), delta.data_ptr<float>(), L,
                     qt_index.data_ptr<int32_t>(), qt_slot.data_ptr<int32_t>(), qt_count.data_ptr<int32_t>(), M,
                     G, md, dq, dk, dv, need_dbias ? dbias.data_ptr<float>() : nullptr,
                     need_dtemp ? dtemp.data_ptr<float>() : nullptr);
  };
  if (q.scalar_type() == at::kFloat) {
    run(float{});
  } else if (q.scalar_type() == at::kBFloat16) {
    run(at::BFloat16{});
  } else {
    TORCH_CHECK(false, "block_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  std::vector<at::Tensor> res{dq, dk, dv};
  res.push_back(need_dbias ? dbias : at::Tensor());
  res.push_back(need_dtemp ? dtemp.sum({0, 2}) : at::Tensor());
  return res;
}

// In-place log-sum-exp merge of a query-gathered partial result into natural-order rows (inference only):
// for every row i with hit[i], (out[i], lse[i]) <- merge((out[i], lse[i]), (po[src[i]], plse[src[i]])).
// Each row is touched by one iteration, so rows run in parallel without atomics.
void merge_gathered_(at::Tensor& out, at::Tensor& lse, const at::Tensor& po, const at::Tensor& plse,
                     const at::Tensor& src, const at::Tensor& hit) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && po.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat &&
                  plse.scalar_type() == at::kFloat, "merge_gathered_: float32 tensors only");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && po.is_contiguous() && plse.is_contiguous() &&
                  src.is_contiguous() && hit.is_contiguous(), "merge_gathered_: contiguous tensors only");
  TORCH_CHECK(out.dim() == 2 && po.dim() == 2 && out.size(1) == po.size(1), "merge_gathered_: out (n, Dv), po (P, Dv)");
  const int64_t n = out.size(0), Dv = out.size(1), P = po.size(0);
  TORCH_CHECK(lse.numel() == n && plse.numel() == P && src.numel() == n && hit.numel() == n,
              "merge_gathered_: lse (n,), plse (P,), src (n,), hit (n,)");
  TORCH_CHECK(src.scalar_type() == at::kLong && hit.scalar_type() == at::kBool, "merge_gathered_: src int64, hit bool");
  float* o = out.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  const float* p = po.data_ptr<float>();
  const float* pl = plse.data_ptr<float>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const bool* hp = hit.data_ptr<bool>();
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      if (!hp[i]) continue;
      const int64_t j = sp[i];
      TORCH_CHECK(j >= 0 && j < P, "merge_gathered_: src entry out of range");
      const float l1 = l[i], l2 = pl[j];
      const float m = std::max(l1, l2);
      if (m == NEG_INF) continue;  // neither part saw a key
      const float w1 = l1 == NEG_INF ? 0.f : std::exp(l1 - m), w2 = l2 == NEG_INF ? 0.f : std::exp(l2 - m);
      const float s = w1 + w2, a = w1 / s, b = w2 / s;
      float* orow = o + i * Dv;
      const float* prow = p + j * Dv;
      for (int64_t c = 0; c < Dv; ++c) orow[c] = a * orow[c] + b * prow[c];
      l[i] = m + std::log(s);
    }
  });
}

void set_gemm(int64_t which) {
  TORCH_CHECK(which == 0 || which == 1, "gemm engine must be 0 (own) or 1 (brgemm)");
#ifndef CPUBLAS_BRGEMM_F32F32F32
  TORCH_CHECK(which == 0, "this torch has no fp32 cpublas::brgemm");
#endif
  g_gemm = static_cast<int>(which);
}

int64_t get_gemm() { return g_gemm; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse attention forward -> (out, lse)");
  m.def("backward", &backward, "block-sparse attention backward -> (dq, dk, dv, dbias, dtemp)");
  m.def("transpose_layout", &transpose_layout, "per key block, the (query block, slot) pairs visiting it");
  m.def("merge_gathered_", &merge_gathered_, "in-place lse merge of a gathered partial result (inference)");
  m.def("set_gemm", &set_gemm, "tile product engine: 0 own micro-kernel, 1 cpublas::brgemm");
  m.def("get_gemm", &get_gemm, "tile product engine in use");
  m.def("vec_size", []() { return static_cast<int64_t>(fVec::size()); }, "floats per ATen vector in this build");
}
