// lorafold's CPU kernels: paged decode attention, the fused multi-LoRA shrink + expand, and
// an adapter load's layout into the pools.
//
// Why compiled code: on CPU the pure-torch versions of both are bound by dispatch and copies,
// not by arithmetic. Decode attention through torch gathers every sequence's K/V blocks into
// a padded batch (one copy per layer) before SDPA reads it again; the LoRA path issues a few
// tiny matmuls per adapter group, per slice, per layer (~120 fused calls per SmolLM2 forward),
// each costing 5-10 us whatever its size. Here each op is one call per layer that reads
// the K/V blocks and the adapter rows where they lie, exactly once.
//
// Both ops are registered with the dispatcher as `lorafold_cpu::*` (CPU; float32 activations,
// the LoRA op's adapter pools float32 or bfloat16: half the bytes to read, widened in registers);
// `kernels/cpu_ext.py` builds this file on first use and falls back to the torch path when
// it cannot. Threads: ATen's intra-op pool (at::parallel_for), so torch.set_num_threads
// governs these ops as it governs the matmuls around them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using namespace lorafold_simd;

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float dot_v(const float* __restrict a, const float* __restrict b, int64_t n) {
  vf8 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
  float s = hsum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Contexts are scattered blocks: the hardware prefetcher cannot see the next block coming,
// so its rows of this head are requested while the current block is being computed.
inline void prefetch_rows(const float* first, int64_t n, int64_t stride, int64_t width) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(first + j * stride + c, 0, 3);
  }
}

// exp for the softmax, branch-free so `omp simd` vectorises it (a scalar libm call per score
// cost as much as the rest of the attention): exp(x) = 2^n e^r, n = round(x / ln 2),
// |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error < 2e-8, below float
// rounding). Inputs are scores minus their maximum (<= 0); below -87 the result underflows
// to ~1e-38, which is 0 for the sum it enters.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

void check_index(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------
// Paged decode attention: one query token per sequence over its cached context.
//
//   q            [B, H, D]            out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b
//   k/v_cache    [slots, Hkv, D]      slot = block * block_size + offset
//   block_tables [B, nb] int64        the sequence's blocks, in order (padding never read)
//   context_lens [B] int64
//
// One task per (sequence, KV head): the H/Hkv query heads sharing a KV head read each cached
// K/V row once, straight from its block. Two passes over the context (scores, then the
// weighted sum of V), the scores kept in a per-thread buffer: contexts are a few thousand
// tokens at most, so the buffer stays in cache.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale) {
  check_f32_contig(q, "q");
  check_f32_contig(k_cache, "k_cache");
  check_f32_contig(v_cache, "v_cache");
  check_index(block_tables, "block_tables", at::kLong);
  check_index(context_lens, "context_lens", at::kLong);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "q must be [B, H, D] and the caches [slots, Hkv, D] of one shape");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == D, "head_dim of q (", D, ") and the cache (", k_cache.size(2), ") differ");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads (", H, ") must be a multiple of KV heads (", Hkv, ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && context_lens.numel() == B,
              "block_tables must be [B, nb] and context_lens [B] for B = ", B);
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  const int64_t G = H / Hkv, nb = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= nb * block_size, "context length ", lens[b], " of sequence ", b,
                " is outside the block table (", nb * block_size, " tokens)");
    max_len = std::max(max_len, lens[b]);
  }
  for (int64_t i = 0; i < B * nb; ++i) {
    TORCH_CHECK(bt[i] >= 0 && (bt[i] + 1) * block_size <= slots, "block ", bt[i], " is outside the cache");
  }
  at::Tensor out = at::empty_like(q);
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = Hkv * D;  // floats between consecutive cache slots

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(G * max_len));
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv, len = lens[b];
      const float* qb = qp + (b * H + g * G) * D;
      const int64_t* table = bt + b * nb;
      // scores[h][t] = scale * q_h . k_t, eight tokens at a time per head (one hsum8x8)
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const int64_t n = std::min(block_size, len - t0);
        const float* kb = kp + table[t0 / block_size] * block_size * row + g * D;
        if (t0 + block_size < len) {
          prefetch_rows(kp + table[t0 / block_size + 1] * block_size * row + g * D,
                        std::min(block_size, len - t0 - block_size), row, D);
        }
        int64_t j = 0;
        if (D % 8 == 0) {
          for (; j + 8 <= n; j += 8) {
            for (int64_t h = 0; h < G; ++h) {
              const float* qh = qb + h * D;
              vf8 acc[8] = {};
              for (int64_t d = 0; d < D; d += 8) {
                const vf8 qv = load8(qh + d);
                for (int u = 0; u < 8; ++u) acc[u] += qv * load8(kb + (j + u) * row + d);
              }
              store8(scores.data() + h * len + t0 + j, fscale * hsum8x8(acc));
            }
          }
        }
        for (; j < n; ++j) {
          for (int64_t h = 0; h < G; ++h) scores[h * len + t0 + j] = fscale * dot_v(qb + h * D, kb + j * row, D);
        }
      }
      for (int64_t h = 0; h < G; ++h) {  // softmax in place: scores -> probabilities
        float* sc = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sc[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = exp_neg(sc[t] - m);
          sum += sc[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sc[t] *= inv;
      }
      // out_h = sum_t p[h][t] v_t, 64 columns at a time held in registers over the context
      for (int64_t h = 0; h < G; ++h) {
        const float* p = scores.data() + h * len;
        float* o = op + (b * H + g * G + h) * D;
        int64_t c0 = 0;
        for (; c0 + 64 <= D; c0 += 64) {
          vf8 a[8] = {};
          for (int64_t t0 = 0; t0 < len; t0 += block_size) {
            const int64_t n = std::min(block_size, len - t0);
            const float* vb = vp + table[t0 / block_size] * block_size * row + g * D + c0;
            if (t0 + block_size < len) {
              prefetch_rows(vp + table[t0 / block_size + 1] * block_size * row + g * D + c0,
                            std::min(block_size, len - t0 - block_size), row, 64);
            }
            for (int64_t j = 0; j < n; ++j) {
              const float pt = p[t0 + j];
              for (int v = 0; v < 8; ++v) a[v] += pt * load8(vb + j * row + 8 * v);
            }
          }
          for (int v = 0; v < 8; ++v) store8(o + c0 + 8 * v, a[v]);
        }
        if (c0 < D) {  // head_dim not a multiple of 64: the rest through a scalar-tail axpy
          float* rest = acc.data();
          std::fill(rest, rest + (D - c0), 0.f);
          for (int64_t t0 = 0; t0 < len; t0 += block_size) {
            const int64_t n = std::min(block_size, len - t0);
            const float* vb = vp + table[t0 / block_size] * block_size * row + g * D + c0;
            for (int64_t j = 0; j < n; ++j) axpy(rest, p[t0 + j], vb + j * row, D - c0);
          }
          std::copy(rest, rest + (D - c0), o + c0);
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Fused multi-LoRA shrink + expand (no autograd), in place:
//
//   for each token t with slot s, slice i with rank r = ranks[i, s] > 0, rows R = row_start[s]:
//     y = A_i[R : R + r] x_t                       (a_pool [n_slices, rows, d_in])
//     out[t, off_i : off_{i+1}] += y^T B[R : R + r, off_i : off_{i+1}]   (b_pool [rows, D])
//
// The batch is described by the meta of `kernels/meta.py`: tokens sorted into segments of
// one slot each (sorted_tokens, seg_slots, seg_starts). A task is (segment, block of up to
// TOKEN_BLOCK of its tokens, slice): each reads its adapter rows once per token block (from
// cache for the later tokens of the block) and writes only its tokens' columns of its slice,
// so tasks never write the same element. Tasks are spread over the threads by cost (rank x
// tokens x width), longest first: adapters of ranks 8 to 128 in one step differ 16x in work.
constexpr int64_t TOKEN_BLOCK = 4;

struct LoRATask {
  int64_t slot, seg_lo, seg_hi, slice, rank;
  double cost;
};

// Register-blocked micro-kernels (see the vector helpers at the top): the shrink keeps NR
// rows x NT tokens of dot products in flight (independent accumulators hide FMA latency;
// each loaded A or x vector feeds several of them); the expand keeps NT tokens x 16 output
// columns in registers while the r rows of B stream through.
// acc[j][k] += A[j] . x_k over bfloat16 columns [c, ...), 2 x V's lanes a step, A and x
// split even / odd (simd.h); returns the first column left for the narrower steps.
template <typename V, int NR, int NT>
inline int64_t shrink_split(const at::BFloat16* a, int64_t d_in, const float* const* xs, vf8 (&acc)[NR][NT],
                            int64_t c) {
  constexpr int64_t kCols = 2 * sizeof(V) / sizeof(float);
  V part[NR][NT];
  for (int j = 0; j < NR; ++j) {
    for (int k = 0; k < NT; ++k) part[j][k] = widen<V>(acc[j][k]);
  }
  for (; c + kCols <= d_in; c += kCols) {
    V xe[NT], xo[NT];
    for (int k = 0; k < NT; ++k) load_split(xs[k] + c, xe[k], xo[k]);
    for (int j = 0; j < NR; ++j) {
      V ae, ao;
      load_split(a + j * d_in + c, ae, ao);
      for (int k = 0; k < NT; ++k) part[j][k] += ae * xe[k] + ao * xo[k];
    }
  }
  for (int j = 0; j < NR; ++j) {
    for (int k = 0; k < NT; ++k) acc[j][k] = fold(part[j][k]);
  }
  return c;
}

// y[k * ldy + j] = A[j] . x_k  for j < NR, k < NT.
template <int NR, int NT, typename W>
inline void shrink_tile(const W* a, int64_t d_in, const float* const* xs, float* y, int64_t ldy) {
  vf8 acc[NR][NT] = {};
  int64_t c = 0;
  if constexpr (std::is_same_v<W, at::BFloat16>) {  // 32 (AVX-512), then 16 columns a step, split even / odd
    if constexpr (kWideVectors) c = shrink_split<vf16>(a, d_in, xs, acc, c);
    c = shrink_split<vf8>(a, d_in, xs, acc, c);
  }
  for (; c + 8 <= d_in; c += 8) {
    vf8 xv[NT];
    for (int k = 0; k < NT; ++k) xv[k] = load8(xs[k] + c);
    for (int j = 0; j < NR; ++j) {
      const vf8 av = load8(a + j * d_in + c);
      for (int k = 0; k < NT; ++k) acc[j][k] += av * xv[k];
    }
  }
  for (int j = 0; j < NR; ++j) {
    for (int k = 0; k < NT; ++k) {
      float s = hsum(acc[j][k]);
      for (int64_t t = c; t < d_in; ++t) s += to_float(a[j * d_in + t]) * xs[k][t];
      y[k * ldy + j] = s;
    }
  }
}

// y[k * ldy + j] = A[j] . x_k for the block's tokens (k < nt), j < r.
template <int NT, typename W>
inline void shrink_rows(const W* a, int64_t d_in, int64_t r, const float* const* xs, float* y, int64_t ldy) {
  constexpr int NR = NT == 1 ? 8 : 2;
  int64_t j = 0;
  for (; j + NR <= r; j += NR) shrink_tile<NR, NT>(a + j * d_in, d_in, xs, y + j, ldy);
  for (; j < r; ++j) shrink_tile<1, NT>(a + j * d_in, d_in, xs, y + j, ldy);
}

template <typename W>
inline void shrink_block(const W* a, int64_t d_in, int64_t r, const float* const* xs, int64_t nt, float* y,
                         int64_t ldy) {
  switch (nt) {
    case 4: shrink_rows<4>(a, d_in, r, xs, y, ldy); return;
    case 3: shrink_rows<3>(a, d_in, r, xs, y, ldy); return;
    case 2: shrink_rows<2>(a, d_in, r, xs, y, ldy); return;
    default: shrink_rows<1>(a, d_in, r, xs, y, ldy); return;
  }
}

// out_k[c : ...] += sum_j y[k][j] * B[j][c : ...] over bfloat16 columns [c, hi), 2 x V's lanes
// a step, B split even / odd and merged once per step; returns the first column left.
template <typename V, int NT>
inline int64_t expand_split(const at::BFloat16* b, int64_t ld_b, int64_t c, int64_t hi, int64_t r, const float* y,
                            float* const* outs) {
  constexpr int64_t kCols = 2 * sizeof(V) / sizeof(float);
  for (; c + kCols <= hi; c += kCols) {
    V even[NT] = {}, odd[NT] = {};
    for (int64_t j = 0; j < r; ++j) {
      V be, bo;
      load_split(b + j * ld_b + c, be, bo);
      for (int k = 0; k < NT; ++k) {
        const float yk = y[k * r + j];
        even[k] += yk * be;
        odd[k] += yk * bo;
      }
    }
    for (int k = 0; k < NT; ++k) add_split(outs[k] + c, even[k], odd[k]);
  }
  return c;
}

// out_k[c : c + 16] += sum_j y[k][j] * B[j][c : c + 16] for k < NT, all c in [lo, hi).
template <int NT, typename W>
inline void expand_rows(const W* b, int64_t ld_b, int64_t lo, int64_t hi, int64_t r, const float* y,
                        float* const* outs) {
  int64_t c = lo;
  if constexpr (std::is_same_v<W, at::BFloat16>) {  // B's 32 (AVX-512), then 16 columns split even / odd
    if constexpr (kWideVectors) c = expand_split<vf16, NT>(b, ld_b, c, hi, r, y, outs);
    c = expand_split<vf8, NT>(b, ld_b, c, hi, r, y, outs);
  }
  for (; c + 16 <= hi; c += 16) {
    vf8 acc[NT][2];
    for (int k = 0; k < NT; ++k) {
      acc[k][0] = load8(outs[k] + c);
      acc[k][1] = load8(outs[k] + c + 8);
    }
    for (int64_t j = 0; j < r; ++j) {
      const vf8 b0 = load8(b + j * ld_b + c), b1 = load8(b + j * ld_b + c + 8);
      for (int k = 0; k < NT; ++k) {
        const float yk = y[k * r + j];
        acc[k][0] += yk * b0;
        acc[k][1] += yk * b1;
      }
    }
    for (int k = 0; k < NT; ++k) {
      store8(outs[k] + c, acc[k][0]);
      store8(outs[k] + c + 8, acc[k][1]);
    }
  }
  for (; c < hi; ++c) {
    for (int k = 0; k < NT; ++k) {
      float s = outs[k][c];
      for (int64_t j = 0; j < r; ++j) s += y[k * r + j] * to_float(b[j * ld_b + c]);
      outs[k][c] = s;
    }
  }
}

template <typename W>
inline void expand_block(const W* b, int64_t ld_b, int64_t lo, int64_t hi, int64_t r, const float* y,
                         float* const* outs, int64_t nt) {
  switch (nt) {
    case 4: expand_rows<4>(b, ld_b, lo, hi, r, y, outs); return;
    case 3: expand_rows<3>(b, ld_b, lo, hi, r, y, outs); return;
    case 2: expand_rows<2>(b, ld_b, lo, hi, r, y, outs); return;
    default: expand_rows<1>(b, ld_b, lo, hi, r, y, outs); return;
  }
}

// The task loop of `lora_apply` for adapter pools of element type W (float or bfloat16).
template <typename W>
void run_lora_tasks(const std::vector<LoRATask>& tasks, const std::vector<std::vector<size_t>>& bins, int64_t max_rank,
                    const float* xp, const W* ap, const W* bp, float* outp, const int32_t* tok, const int32_t* rstart,
                    int64_t d_in, int64_t rows, int64_t D, at::IntArrayRef slice_offsets) {
  at::parallel_for(0, static_cast<int64_t>(bins.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(static_cast<size_t>(TOKEN_BLOCK * max_rank));
    const float* xs[TOKEN_BLOCK];
    float* outs[TOKEN_BLOCK];
    for (int64_t bin = begin; bin < end; ++bin) {
      for (size_t idx : bins[bin]) {
        const LoRATask& task = tasks[idx];
        const int64_t nt = task.seg_hi - task.seg_lo;
        for (int64_t k = 0; k < nt; ++k) {
          const int64_t t = tok[task.seg_lo + k];
          xs[k] = xp + t * d_in;
          outs[k] = outp + t * D;
        }
        const int64_t r0 = rstart[task.slot];
        shrink_block(ap + (task.slice * rows + r0) * d_in, d_in, task.rank, xs, nt, y.data(), task.rank);
        expand_block(bp + r0 * D, D, slice_offsets[task.slice], slice_offsets[task.slice + 1], task.rank, y.data(),
                     outs, nt);
      }
    }
  });
}

void lora_apply(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool, const at::Tensor& row_start,
                const at::Tensor& ranks, const at::Tensor& sorted_tokens, const at::Tensor& seg_slots,
                const at::Tensor& seg_starts, at::IntArrayRef slice_offsets, const at::Tensor& out) {
  check_f32_contig(x, "x");
  TORCH_CHECK(a_pool.device().is_cpu() && b_pool.device().is_cpu(), "a_pool and b_pool must be CPU tensors");
  TORCH_CHECK(a_pool.scalar_type() == b_pool.scalar_type() &&
                  (a_pool.scalar_type() == at::kFloat || a_pool.scalar_type() == at::kBFloat16),
              "a_pool and b_pool must both be float32 or both bfloat16, got ", a_pool.scalar_type(), " and ",
              b_pool.scalar_type());
  TORCH_CHECK(a_pool.is_contiguous() && b_pool.is_contiguous(), "a_pool and b_pool must be contiguous");
  check_f32_contig(out, "out");
  check_index(row_start, "row_start", at::kInt);
  check_index(ranks, "ranks", at::kInt);
  check_index(sorted_tokens, "sorted_tokens", at::kInt);
  check_index(seg_slots, "seg_slots", at::kInt);
  check_index(seg_starts, "seg_starts", at::kInt);
  TORCH_CHECK(x.dim() == 2 && a_pool.dim() == 3 && b_pool.dim() == 2 && out.dim() == 2,
              "expected x [T, d_in], a_pool [n_slices, rows, d_in], b_pool [rows, D], out [T, D]");
  const int64_t T = x.size(0), d_in = x.size(1), n_slices = a_pool.size(0), rows = a_pool.size(1);
  const int64_t D = b_pool.size(1), num_slots = row_start.numel(), S = seg_slots.numel();
  TORCH_CHECK(a_pool.size(2) == d_in && b_pool.size(0) == rows && out.size(0) == T && out.size(1) == D,
              "x, a_pool, b_pool and out disagree in shape");
  TORCH_CHECK(static_cast<int64_t>(slice_offsets.size()) == n_slices + 1 && slice_offsets[0] == 0 &&
                  slice_offsets[n_slices] == D,
              "slice_offsets must be n_slices + 1 column offsets from 0 to D");
  TORCH_CHECK(ranks.dim() == 2 && ranks.size(0) == n_slices && ranks.size(1) == num_slots,
              "ranks must be [n_slices, num_slots]");
  TORCH_CHECK(seg_starts.numel() == S + 1, "seg_starts must have one more entry than seg_slots");
  const int32_t* tok = sorted_tokens.data_ptr<int32_t>();
  const int32_t* sslot = seg_slots.data_ptr<int32_t>();
  const int32_t* sstart = seg_starts.data_ptr<int32_t>();
  const int32_t* rstart = row_start.data_ptr<int32_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  TORCH_CHECK(sstart[0] == 0 && sstart[S] <= sorted_tokens.numel(), "seg_starts outside sorted_tokens");
  for (int64_t i = 0; i < sstart[S]; ++i) TORCH_CHECK(tok[i] >= 0 && tok[i] < T, "token index ", tok[i], " out of range");

  std::vector<LoRATask> tasks;
  int64_t max_rank = 0;
  for (int64_t k = 0; k < S; ++k) {
    const int64_t s = sslot[k];
    TORCH_CHECK(s >= 0 && s < num_slots, "segment slot ", s, " out of range");
    TORCH_CHECK(sstart[k] <= sstart[k + 1], "seg_starts must be non-decreasing");
    for (int64_t i = 0; i < n_slices; ++i) {
      const int64_t r = rk[i * num_slots + s];
      if (r <= 0) continue;
      TORCH_CHECK(rstart[s] >= 0 && rstart[s] + r <= rows, "slot ", s, " rows run past the pool");
      max_rank = std::max(max_rank, r);
      const double width = static_cast<double>(d_in + slice_offsets[i + 1] - slice_offsets[i]);
      for (int64_t lo = sstart[k]; lo < sstart[k + 1]; lo += TOKEN_BLOCK) {
        const int64_t hi = std::min<int64_t>(lo + TOKEN_BLOCK, sstart[k + 1]);
        tasks.push_back({s, lo, hi, i, r, static_cast<double>(r * (hi - lo)) * width});
      }
    }
  }
  if (tasks.empty()) return;
  // Longest-processing-time-first onto the least loaded of nthreads bins.
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<size_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tasks[a].cost > tasks[b].cost; });
  std::vector<std::vector<size_t>> bins(nthreads);
  std::vector<double> load(nthreads, 0.0);
  for (size_t idx : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    bins[t].push_back(idx);
    load[t] += tasks[idx].cost;
  }
  const float* xp = x.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  if (a_pool.scalar_type() == at::kBFloat16) {
    run_lora_tasks(tasks, bins, max_rank, xp, a_pool.data_ptr<at::BFloat16>(), b_pool.data_ptr<at::BFloat16>(), outp,
                   tok, rstart, d_in, rows, D, slice_offsets);
  } else {
    run_lora_tasks(tasks, bins, max_rank, xp, a_pool.data_ptr<float>(), b_pool.data_ptr<float>(), outp, tok, rstart,
                   d_in, rows, D, slice_offsets);
  }
}


// ---------------------------------------------------------------------------------------
// An adapter's share of one LoRA layer, laid out into rows of its pools (a load):
//
//   a_dst [n_slices, rows, d_in]   a_dst[i, :r_i] = A_i, zeros past r_i
//   b_dst [rows, D]                b_dst[:r_i, slice i cols] = (scale_i * B_i)^T, zeros past r_i
//
// A_i [r_i, d_in] and B_i [D_i, r_i] float32 (any strides), or absent (r_i = 0); the pools
// float32, bfloat16 or float16 (rounded to nearest even, as torch's casts do). The torch version
// (`slots._lay_out_torch`, the reference) costs four ops per slice, ~210 slices for one
// SmolLM2 adapter: 7 ms per load, of which moving its 18.6 MiB is about 2.

template <typename T>
void lay_out_slice(T* a_rows, T* b_rows, int64_t b_stride, int64_t rows, int64_t d_in, int64_t width,
                   const at::Tensor* a, const at::Tensor* b, float scale) {
  const int64_t r = a ? a->size(0) : 0;
  if (r) {
    const float* ap = a->data_ptr<float>();
    const int64_t as0 = a->stride(0), as1 = a->stride(1);
    for (int64_t j = 0; j < r; ++j) {
      T* dst = a_rows + j * d_in;
      const float* src = ap + j * as0;
      if (std::is_same<T, float>::value && as1 == 1) {
        std::memcpy(dst, src, d_in * sizeof(float));
      } else {
        for (int64_t c = 0; c < d_in; ++c) dst[c] = static_cast<T>(src[c * as1]);
      }
    }
    const float* bp = b->data_ptr<float>();
    const int64_t bs0 = b->stride(0), bs1 = b->stride(1);
    // a transpose: row j of the pool gathers column j of B, a tile of B's rows at a time so
    // that the strided reads hit L1 (a whole column at once walks all of B per row)
    constexpr int64_t TILE = 64;
    for (int64_t c0 = 0; c0 < width; c0 += TILE) {
      const int64_t c1 = std::min(c0 + TILE, width);
      for (int64_t j = 0; j < r; ++j) {
        T* dst = b_rows + j * b_stride;
        const float* src = bp + j * bs1;
        for (int64_t c = c0; c < c1; ++c) dst[c] = static_cast<T>(src[c * bs0] * scale);
      }
    }
  }
  std::memset(a_rows + r * d_in, 0, (rows - r) * d_in * sizeof(T));  // all-zero bits are 0.0 in both dtypes
  for (int64_t j = r; j < rows; ++j) std::memset(b_rows + j * b_stride, 0, width * sizeof(T));
}

at::Tensor lora_lay_out(const at::Tensor& a_dst, const at::Tensor& b_dst, const c10::List<std::optional<at::Tensor>>& lora_a,
                        const c10::List<std::optional<at::Tensor>>& lora_b, at::ArrayRef<double> scales,
                        at::IntArrayRef slice_offsets) {
  TORCH_CHECK(a_dst.device().is_cpu() && b_dst.device().is_cpu(), "a_dst and b_dst must be CPU tensors");
  const auto dtype = a_dst.scalar_type();
  TORCH_CHECK(b_dst.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
              "a_dst and b_dst must both be float32, bfloat16 or float16");
  TORCH_CHECK(a_dst.dim() == 3 && b_dst.dim() == 2, "expected a_dst [n_slices, rows, d_in] and b_dst [rows, D]");
  const int64_t n_slices = a_dst.size(0), rows = a_dst.size(1), d_in = a_dst.size(2), D = b_dst.size(1);
  TORCH_CHECK(a_dst.stride(2) == 1 && a_dst.stride(1) == d_in && b_dst.stride(1) == 1,
              "each slice's rows of a_dst, and each row of b_dst, must be contiguous");
  TORCH_CHECK(b_dst.size(0) == rows, "a_dst and b_dst disagree in rows");
  TORCH_CHECK(static_cast<int64_t>(lora_a.size()) == n_slices && static_cast<int64_t>(lora_b.size()) == n_slices &&
                  static_cast<int64_t>(scales.size()) == n_slices,
              "lora_a, lora_b and scales need one entry per slice");
  TORCH_CHECK(static_cast<int64_t>(slice_offsets.size()) == n_slices + 1 && slice_offsets[0] == 0 &&
                  slice_offsets[n_slices] == D,
              "slice_offsets must be n_slices + 1 column offsets from 0 to D");
  at::Tensor ranks = at::zeros({n_slices}, at::kInt);
  int32_t* rank_of = ranks.data_ptr<int32_t>();
  std::vector<std::optional<at::Tensor>> as(n_slices), bs(n_slices);
  for (int64_t i = 0; i < n_slices; ++i) {
    as[i] = lora_a.get(i);
    bs[i] = lora_b.get(i);
    TORCH_CHECK(as[i].has_value() == bs[i].has_value(), "slice ", i, ": lora_a and lora_b must be given together");
    if (!as[i]) continue;
    const at::Tensor &a = *as[i], &b = *bs[i];
    const int64_t width = slice_offsets[i + 1] - slice_offsets[i];
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kFloat &&
                    b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2,
                "slice ", i, ": lora_a and lora_b must be 2-D float32 CPU tensors");
    TORCH_CHECK(a.size(0) <= rows && a.size(1) == d_in && b.size(0) == width && b.size(1) == a.size(0),
                "slice ", i, ": expected lora_a [r <= ", rows, ", ", d_in, "] and lora_b [", width, ", r]");
    rank_of[i] = static_cast<int32_t>(a.size(0));
  }
  auto run = [&](auto* a_base, auto* b_base) {
    for (int64_t i = 0; i < n_slices; ++i) {
      lay_out_slice(a_base + i * a_dst.stride(0), b_base + slice_offsets[i], b_dst.stride(0), rows, d_in,
                    slice_offsets[i + 1] - slice_offsets[i], as[i] ? &*as[i] : nullptr, bs[i] ? &*bs[i] : nullptr,
                    static_cast<float>(scales[i]));
    }
  };
  if (dtype == at::kBFloat16) {
    run(a_dst.data_ptr<at::BFloat16>(), b_dst.data_ptr<at::BFloat16>());
  } else if (dtype == at::kHalf) {
    run(a_dst.data_ptr<at::Half>(), b_dst.data_ptr<at::Half>());
  } else {
    run(a_dst.data_ptr<float>(), b_dst.data_ptr<float>());
  }
  return ranks;
}

}  // namespace

TORCH_LIBRARY(lorafold_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale) -> Tensor");
  m.def(
      "lora_apply(Tensor x, Tensor a_pool, Tensor b_pool, Tensor row_start, Tensor ranks, Tensor sorted_tokens, "
      "Tensor seg_slots, Tensor seg_starts, int[] slice_offsets, Tensor(a!) out) -> ()");
  m.def(
      "lora_lay_out(Tensor(a!) a_dst, Tensor(b!) b_dst, Tensor?[] lora_a, Tensor?[] lora_b, float[] scales, "
      "int[] slice_offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorafold_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("lora_apply", &lora_apply);
  m.impl("lora_lay_out", &lora_lay_out);
}
