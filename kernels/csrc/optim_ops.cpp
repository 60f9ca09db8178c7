// AdaPreLoRA's optimizer step over the LoRA factors, compiled (training/optim/adaprelora.py;
// driven by training/optim/_adaprelora_cpu.py).
//
// Why compiled code: the optimizer's O((m + n) r²) work is ~9 r-wide products per factor row
// (Grams, the low-rank statistic's quadratic forms, the weighted Grams, the two directions).
// Through torch each is a batched matmul over a stacked copy of the factors, with the
// elementwise steps and the r×r algebra (a batched linalg call per product, ~60-80 us each
// whatever the size) between them: on one CPU thread that is ~2.4x the time of torch's
// AdamW step. Here one task per layer does every pass on the factors where they lie (no
// stacking), in register tiles, with the elementwise work (row/column scalings, the update,
// momentum, weight decay) folded into the passes and the r×r algebra in between, so a
// layer's factors come from memory once and stay in cache.
//
// Per layer, with A [r, n], B [m, r] (gradients gA, gB alike):
//   m side: row i is w_i = [B_i | gB_i] (2r);   n side: column j is x_j = [gA_:j ; A_:j] (2r).
//   layer_grams     Σ_i w_iᵀ w_i and Σ_j x_j x_jᵀ (2r × 2r each; only gA Aᵀ without the statistic)
//   stat_kernels_layer  the low-rank statistic's K_row, K_col from them (r×r algebra)
//   layer_weights   [fold row_sq[i] = w_i K_row w_iᵀ, col_sq[j] = x_jᵀ K_col x_j into the
//                   Adafactor state], then ell, rho and Σ_i ell_i B_iᵀ B_i, Σ_j rho_j A_:j A_:jᵀ
//   (damped inverses and direction factors, r×r)
//   layer_update    dA = left (gA / rho) + hc A,  dB = (gB / ell) right + B hc;
//                   p <- (p + lr d) * decay, d through a momentum when one is given.
// Sums are accumulated in fp32 registers over a cache-sized chunk of rows or columns and in
// float64 across chunks. Threads: one task per layer on ATen's intra-op pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using namespace lorafold_simd;

// (vf8{} + x would be a real add: 0 + x is not x for x = -0, so gcc keeps it)
inline vf8 bcast(float x) { return vf8{x, x, x, x, x, x, x, x}; }

// Keeps v in a register: without it gcc folds a vector reused by several FMAs into each
// FMA's memory operand, and the repeated loads (12 per 8 FMAs) saturate the load ports.
inline void pin(vf8& v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// The n side walks 2r strided rows 16 columns (one cache line) at a time: 2r interleaved
// streams, more than the hardware prefetcher follows, so each row's line `ahead` floats on
// is requested while the current block is computed.
inline void prefetch_rows_ahead(const float* const* x, int64_t rows, int64_t at, int64_t limit) {
  if (at >= limit) return;
  for (int64_t p = 0; p < rows; ++p) __builtin_prefetch(x[p] + at, 0, 3);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------
// Layer lists: the factors of one call share their rank r; m and n vary per layer.

struct Layer {
  const float* a;   // [r, n]
  const float* b;   // [m, r]
  const float* ga;  // [r, n]
  const float* gb;  // [m, r]
  int64_t m, n;
};

std::vector<Layer> layers_of(const at::TensorList& a, const at::TensorList& b, const at::TensorList& ga,
                             const at::TensorList& gb, int64_t* rank) {
  const size_t k = a.size();
  TORCH_CHECK(k > 0, "no layers given");
  TORCH_CHECK(b.size() == k && ga.size() == k && gb.size() == k, "A, B, gA and gB must list the same layers (got ",
              a.size(), ", ", b.size(), ", ", ga.size(), ", ", gb.size(), ")");
  std::vector<Layer> out(k);
  const int64_t r = a[0].dim() == 2 ? a[0].size(0) : -1;
  TORCH_CHECK(r >= 1, "A must be [r, n] with r >= 1");
  for (size_t l = 0; l < k; ++l) {
    check_f32_contig(a[l], "A");
    check_f32_contig(b[l], "B");
    check_f32_contig(ga[l], "gA");
    check_f32_contig(gb[l], "gB");
    TORCH_CHECK(a[l].dim() == 2 && a[l].size(0) == r, "layer ", l, ": A must be [", r, ", n] (one rank per call)");
    TORCH_CHECK(b[l].dim() == 2 && b[l].size(1) == r, "layer ", l, ": B must be [m, ", r, "]");
    TORCH_CHECK(ga[l].sizes() == a[l].sizes(), "layer ", l, ": gA must have A's shape");
    TORCH_CHECK(gb[l].sizes() == b[l].sizes(), "layer ", l, ": gB must have B's shape");
    out[l] = {a[l].data_ptr<float>(), b[l].data_ptr<float>(), ga[l].data_ptr<float>(), gb[l].data_ptr<float>(),
              b[l].size(0), a[l].size(1)};
  }
  *rank = r;
  return out;
}

void check_vectors(const at::TensorList& v, const std::vector<Layer>& layers, bool rows, const char* name) {
  TORCH_CHECK(v.size() == layers.size(), name, " must list one vector per layer");
  for (size_t l = 0; l < layers.size(); ++l) {
    check_f32_contig(v[l], name);
    const int64_t want = rows ? layers[l].m : layers[l].n;
    TORCH_CHECK(v[l].dim() == 1 && v[l].size(0) == want, "layer ", l, ": ", name, " must be [", want, "]");
  }
}

// ---------------------------------------------------------------------------------------
// m side: blocks of rows of [B | gB]. When r is a multiple of 8 the whole 24-row groups are
// read where they lie; the rest (all rows otherwise) is copied into a local buffer w [R, C]
// with each half zero-padded to rp = round_up(r, 8) floats (C = 2 rp), so every tile is whole
// vectors. Column c < rp of a block is B's, column rp + c is gB's.

struct RowBlock {
  const float* b;  // row 0, column 0 of the B half
  const float* g;  // row 0, column 0 of the gB half
  int64_t ld, rp, R;  // row stride, half width, rows (a multiple of 24; rows past the data are zero)
  const float* col(int64_t c) const { return c < rp ? b + c : g + (c - rp); }
};

struct RowChunks {
  int64_t r, rp, C, rows;  // rows per chunk (a multiple of 24: whole 6- and 8-row tiles)
  explicit RowChunks(int64_t rank) : r(rank), rp(round_up(rank, 8)), C(2 * round_up(rank, 8)) {
    rows = std::max<int64_t>(24, (4096 / C) / 24 * 24);  // ~16 KB of rows: stays in L1
  }
  // Copies rows [i0, i0 + n) into w (R = round_up(n, 24) rows, the extra ones zero).
  int64_t load(const Layer& L, int64_t i0, int64_t n, float* w) const {
    const int64_t R = round_up(n, 24);
    for (int64_t i = 0; i < n; ++i) {
      float* row = w + i * C;
      const float* bs = L.b + (i0 + i) * r;
      const float* gs = L.gb + (i0 + i) * r;
      for (int64_t q = 0; q < rp; ++q) {
        row[q] = q < r ? bs[q] : 0.f;
        row[rp + q] = q < r ? gs[q] : 0.f;
      }
    }
    std::memset(w + n * C, 0, sizeof(float) * (R - n) * C);
    return R;
  }
  // f(block, i0, n) over the layer's rows in order; rows [i0, i0 + n) of the layer are the
  // block's first n rows.
  template <typename F>
  void each(const Layer& L, float* w, F&& f) const {
    int64_t i0 = 0;
    if (r == rp) {
      const int64_t whole = L.m / 24 * 24;
      while (i0 < whole) {
        const int64_t n = std::min(rows, whole - i0);
        f(RowBlock{L.b + i0 * r, L.gb + i0 * r, r, rp, n}, i0, n);
        i0 += n;
      }
    }
    for (; i0 < L.m; i0 += rows) {
      const int64_t n = std::min(rows, L.m - i0);
      const int64_t R = load(L, i0, n, w);
      f(RowBlock{w, w + rp, C, rp, R}, i0, n);
    }
  }
};

// Column blocks [qb, qb + 8 NV) of [0, width) that never straddle the two halves: f(qb, nv).
template <typename F>
inline void col_blocks(int64_t from, int64_t width, int64_t rp, F&& f) {
  for (int64_t hs = 0; hs < width; hs += rp) {
    const int64_t he = std::min(hs + rp, width);
    int64_t qb = std::max(hs, from);
    for (; qb + 16 <= he; qb += 16) f(qb, 2);
    if (qb < he) f(qb, 1);
  }
}

// g[pb + u, qb + 8v + l] += Σ_i (x[i, u]) (s_i y[i, 8v + l]), u < 4, v < NV; x, y point at
// columns pb and qb of row 0, row stride ld.
template <int NV, bool SCALED>
inline void gram_rows_tile(const float* x, const float* y, int64_t ld, int64_t R, const float* scale, double* g,
                           int64_t ldg) {
  vf8 acc[4][NV] = {};
  for (int64_t i = 0; i < R; ++i) {
    vf8 yv[NV];
    for (int v = 0; v < NV; ++v) yv[v] = load8(y + i * ld + 8 * v);
    if (SCALED) {
      for (int v = 0; v < NV; ++v) yv[v] *= bcast(scale[i]);
    }
    for (int u = 0; u < 4; ++u) {
      const vf8 xv = bcast(x[i * ld + u]);
      for (int v = 0; v < NV; ++v) acc[u][v] += xv * yv[v];
    }
  }
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < NV; ++v)
      for (int l = 0; l < 8; ++l) g[u * ldg + 8 * v + l] += acc[u][v][l];
}

// Upper block triangle (column blocks from the one holding the diagonal) of Σ_i s_i wᵢᵀ wᵢ
// over the block's columns [0, width), into g [C, C] (row stride ldg).
void gram_rows_upper(const RowBlock& blk, int64_t width, const float* scale, double* g, int64_t ldg) {
  for (int64_t pb = 0; pb < width; pb += 4) {
    const float* x = blk.col(pb);
    col_blocks(pb / 8 * 8, width, blk.rp, [&](int64_t qb, int nv) {
      const float* y = blk.col(qb);
      double* out = g + pb * ldg + qb;
      if (scale == nullptr) {
        nv == 2 ? gram_rows_tile<2, false>(x, y, blk.ld, blk.R, nullptr, out, ldg)
                : gram_rows_tile<1, false>(x, y, blk.ld, blk.R, nullptr, out, ldg);
      } else {
        nv == 2 ? gram_rows_tile<2, true>(x, y, blk.ld, blk.R, scale, out, ldg)
                : gram_rows_tile<1, true>(x, y, blk.ld, blk.R, scale, out, ldg);
      }
    });
  }
}

// acc[u][v] += Σ_{t < count} x[u * ld + t] M[t * ldm + 8v ..]: MR rows of one half times
// count rows of M. MR = 6, NV = 2 is the 6 × 16 tile of AVX2 GEMM kernels: 12 independent
// accumulators hide the FMA latency, and 8 loads feed 12 FMAs.
template <int MR, int NV>
inline void rows_acc(const float* x, int64_t ld, const float* M, int64_t ldm, int64_t count, vf8 (&acc)[MR][NV]) {
  for (int64_t t = 0; t < count; ++t) {
    vf8 mv[NV];
    for (int v = 0; v < NV; ++v) {
      mv[v] = load8(M + t * ldm + 8 * v);
      pin(mv[v]);
    }
    for (int u = 0; u < MR; ++u) {
      const vf8 xv = bcast(x[u * ld + t]);
      for (int v = 0; v < NV; ++v) acc[u][v] += xv * mv[v];
    }
  }
}

template <int MR, int NV>
inline void zero(vf8 (&acc)[MR][NV]) {
  for (int u = 0; u < MR; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = vf8{};
}

// Quadratic forms out[i] = w_i U w_iᵀ for U upper triangular [C, C] in the padded layout
// (U[c, q] = 0 for c > q, so a column block only needs the rows above its end). tots is
// scratch for R vectors; out gets R entries.
template <int NV>
inline void quad_rows_block(const RowBlock& blk, int64_t ib, const float* U, int64_t C, int64_t qb, vf8 (&tot)[6]) {
  vf8 acc[6][NV];
  zero(acc);
  const int64_t c_end = qb + 8 * NV, rp = blk.rp;
  rows_acc<6, NV>(blk.b + ib * blk.ld, blk.ld, U + qb, C, std::min(c_end, rp), acc);
  if (c_end > rp) rows_acc<6, NV>(blk.g + ib * blk.ld, blk.ld, U + rp * C + qb, C, c_end - rp, acc);
  const float* y = blk.col(qb) + ib * blk.ld;
  for (int u = 0; u < 6; ++u)
    for (int v = 0; v < NV; ++v) tot[u] += acc[u][v] * load8(y + u * blk.ld + 8 * v);
}

void quad_rows(const RowBlock& blk, const float* U, int64_t C, vf8* tots, float* out) {
  for (int64_t ib = 0; ib < blk.R; ib += 6) {
    vf8 tot[6] = {};
    col_blocks(0, 2 * blk.rp, blk.rp, [&](int64_t qb, int nv) {
      nv == 2 ? quad_rows_block<2>(blk, ib, U, C, qb, tot) : quad_rows_block<1>(blk, ib, U, C, qb, tot);
    });
    for (int u = 0; u < 6; ++u) tots[ib + u] = tot[u];
  }
  for (int64_t ib = 0; ib < blk.R; ib += 8) store8(out + ib, hsum8x8(tots + ib));
}

// dB rows of a 6-row tile: d[u, :] = (gB_u right) / ell_u + B_u hc, with M [C, rp] =
// [hc ; right] (rows rp.. are right's); d is [6, rp].
template <int NV>
inline void update_rows_block(const RowBlock& blk, int64_t ib, int64_t r, const float* M, int64_t qb,
                              const float* inv_ell, float* d) {
  vf8 acc[6][NV];
  zero(acc);
  const int64_t rp = blk.rp;
  rows_acc<6, NV>(blk.g + ib * blk.ld, blk.ld, M + rp * rp + qb, rp, r, acc);
  for (int u = 0; u < 6; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] *= bcast(inv_ell[u]);
  rows_acc<6, NV>(blk.b + ib * blk.ld, blk.ld, M + qb, rp, r, acc);
  for (int u = 0; u < 6; ++u)
    for (int v = 0; v < NV; ++v) store8(d + u * rp + qb + 8 * v, acc[u][v]);
}

// ---------------------------------------------------------------------------------------
// n side: the 2r rows [gA ; A] of length n, taken J columns at a time (J a multiple of 16).
// Rows are pointers: gA rows at 0..r-1, A rows at rq..rq+r-1 (rq = round_up(r, 4)), the
// padding rows point at zeros, so every tile is whole. A final partial chunk is copied into
// a zero-padded local block.

struct ColChunks {
  int64_t r, rq, P, J;
  explicit ColChunks(int64_t rank) : r(rank), rq(round_up(rank, 4)), P(2 * round_up(rank, 4)) {
    J = std::max<int64_t>(16, (4096 / P) / 16 * 16);  // ~16 KB of rows: stays in L1
  }
  // Row pointers of columns [j0, j0 + width) (width <= J). Full chunks point into A and gA
  // (stride n); a partial one is copied into `pad` [P, J] (row stride J). Returns the stride.
  int64_t rows(const Layer& L, int64_t j0, int64_t width, std::vector<const float*>& ptr, std::vector<float>& pad,
               const std::vector<float>& zeros) const {
    for (int64_t p = 0; p < P; ++p) ptr[p] = zeros.data();
    if (width == J) {
      for (int64_t p = 0; p < r; ++p) {
        ptr[p] = L.ga + p * L.n + j0;
        ptr[rq + p] = L.a + p * L.n + j0;
      }
      return L.n;
    }
    std::fill(pad.begin(), pad.end(), 0.f);
    for (int64_t p = 0; p < r; ++p) {
      std::memcpy(pad.data() + p * J, L.ga + p * L.n + j0, sizeof(float) * width);
      std::memcpy(pad.data() + (rq + p) * J, L.a + p * L.n + j0, sizeof(float) * width);
      ptr[p] = pad.data() + p * J;
      ptr[rq + p] = pad.data() + (rq + p) * J;
    }
    return J;
  }
};

// acc[4u + v] += Σ_j (x_{p0+u}[j] s[j]) x_{q0+v}[j], u < 2, v < 4, over j < len (8 lanes per
// sum; the lanes are added once, by dot_tiles_finish, after the last chunk).
template <bool SCALED>
inline void dot_tile(const float* const* x, int64_t p0, int64_t q0, int64_t len, const float* scale, vf8* acc_mem) {
  vf8 acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = acc_mem[t];
  const float *p_0 = x[p0], *p_1 = x[p0 + 1];
  const float *q_0 = x[q0], *q_1 = x[q0 + 1], *q_2 = x[q0 + 2], *q_3 = x[q0 + 3];
  for (int64_t j = 0; j < len; j += 8) {
    vf8 a0 = load8(p_0 + j), a1 = load8(p_1 + j);
    if (SCALED) {
      const vf8 s = load8(scale + j);
      a0 *= s;
      a1 *= s;
    }
    pin(a0);
    pin(a1);
    const vf8 b0 = load8(q_0 + j), b1 = load8(q_1 + j), b2 = load8(q_2 + j), b3 = load8(q_3 + j);
    acc[0] += a0 * b0;
    acc[1] += a0 * b1;
    acc[2] += a0 * b2;
    acc[3] += a0 * b3;
    acc[4] += a1 * b0;
    acc[5] += a1 * b1;
    acc[6] += a1 * b2;
    acc[7] += a1 * b3;
  }
  for (int t = 0; t < 8; ++t) acc_mem[t] = acc[t];
}

// The 2 × 4 tiles (p0 step 2, q0 step 4) of a Gram over rows [lo, hi) × [qlo, hi), upper
// block triangle only when `upper`: one slot of 8 vector sums per tile in `acc`.
struct DotTiles {
  int64_t lo, hi, qlo;
  bool upper;
  template <typename F>
  void each(F&& f) const {
    int64_t t = 0;
    for (int64_t p0 = lo; p0 < hi; p0 += 2)
      for (int64_t q0 = upper ? std::max(qlo, p0 / 4 * 4) : qlo; q0 < hi; q0 += 4) f(p0, q0, t++);
  }
  int64_t count() const {
    int64_t n = 0;
    each([&](int64_t, int64_t, int64_t) { ++n; });
    return n;
  }
};

void dot_tiles_run(const DotTiles& tiles, const float* const* x, int64_t len, const float* scale, vf8* acc) {
  tiles.each([&](int64_t p0, int64_t q0, int64_t t) {
    if (scale == nullptr) {
      dot_tile<false>(x, p0, q0, len, nullptr, acc + 8 * t);
    } else {
      dot_tile<true>(x, p0, q0, len, scale, acc + 8 * t);
    }
  });
}

// g[p, q] = the finished sums (float64 [P, P], row stride ldg)
void dot_tiles_finish(const DotTiles& tiles, const vf8* acc, double* g, int64_t ldg) {
  tiles.each([&](int64_t p0, int64_t q0, int64_t t) {
    const vf8 s = hsum8x8(acc + 8 * t);
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 4; ++v) g[(p0 + u) * ldg + q0 + v] = s[4 * u + v];
  });
}

// ---------------------------------------------------------------------------------------
// Per-thread scratch, sized once per call for its rank.

struct Scratch {
  std::vector<float> w, pad, zeros, buf, mat, vec;
  std::vector<double> g;
  std::vector<const float*> ptr;
  std::vector<vf8> acc;
  Scratch(const RowChunks& rc, const ColChunks& cc) {
    const int64_t sq = std::max(rc.C * rc.C, cc.P * cc.P);
    w.resize(rc.rows * rc.C);
    pad.resize(cc.P * cc.J);
    zeros.assign(cc.J, 0.f);
    buf.resize(std::max({rc.rows * rc.rp, cc.rq * 16, rc.rows, cc.J}));
    mat.resize(std::max(sq, rc.C * rc.rp));
    vec.resize(std::max(rc.rows, cc.J));
    g.resize(sq);
    ptr.resize(cc.P);
    acc.resize(std::max<int64_t>(rc.rows, cc.P * cc.P));  // ≥ 8 vectors per 2 × 4 tile
  }
};

// Copies the [n, n] float64 block at `g` (row stride ldg) into out, mirroring the strictly
// lower part from the upper one when `mirror` (the kernels fill only the upper).
void store_sym(const double* g, int64_t ldg, int64_t row0, int64_t col0, int64_t n, float* out, int64_t ldo,
               int64_t orow0, int64_t ocol0, bool mirror) {
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = 0; q < n; ++q) {
      const bool low = mirror && q < p;
      const double v = low ? g[(row0 + q) * ldg + col0 + p] : g[(row0 + p) * ldg + col0 + q];
      out[(orow0 + p) * ldo + ocol0 + q] = static_cast<float>(v);
    }
}

// The unpadded 2r × 2r Gram out (row stride 2r) from a padded float64 sum g (row stride ld)
// whose second half starts at index `half`: the off-diagonal block (and its mirror) always,
// the two diagonal blocks when `diagonal` (filled from their upper triangles).
void store_padded_gram(const double* g, int64_t ld, int64_t half, int64_t r, bool diagonal, float* out) {
  const int64_t o = 2 * r;
  if (diagonal) {
    store_sym(g, ld, 0, 0, r, out, o, 0, 0, true);
    store_sym(g, ld, half, half, r, out, o, r, r, true);
  }
  for (int64_t p = 0; p < r; ++p)
    for (int64_t q = 0; q < r; ++q) {
      const float v = static_cast<float>(g[p * ld + half + q]);
      out[p * o + r + q] = v;
      out[(r + q) * o + p] = v;
    }
}

// ---------------------------------------------------------------------------------------
// Per-layer passes. Each call sees one layer L at rank r; the ops below run them over lists.

// gm [2r, 2r] = Σ_i w_iᵀ w_i over [B | gB], gn [2r, 2r] = Σ_j x_j x_jᵀ over [gA ; A] (both
// zeroed first). With lowrank = false only gn's gA Aᵀ block (and its mirror) is computed.
void layer_grams(const Layer& L, int64_t r, const RowChunks& rc, const ColChunks& cc, bool lowrank, Scratch& s,
                 float* gm, float* gn) {
  const int64_t o = 2 * r;
  std::fill(gm, gm + o * o, 0.f);
  std::fill(gn, gn + o * o, 0.f);
  if (lowrank) {
    std::fill(s.g.begin(), s.g.end(), 0.0);
    rc.each(L, s.w.data(),
            [&](const RowBlock& blk, int64_t, int64_t) { gram_rows_upper(blk, rc.C, nullptr, s.g.data(), rc.C); });
    // blocks: B B (0, 0), B gB (0, rp), gB gB (rp, rp) of the padded C × C sum
    store_padded_gram(s.g.data(), rc.C, rc.rp, r, true, gm);
  }
  // lowrank: the upper block triangle of all 2r rows; else only gA (rows) × A (columns)
  const DotTiles tiles = lowrank ? DotTiles{0, cc.P, 0, true} : DotTiles{0, cc.P, cc.rq, false};
  std::fill(s.acc.begin(), s.acc.begin() + 8 * tiles.count(), vf8{});
  for (int64_t j0 = 0; j0 < L.n; j0 += cc.J) {
    const int64_t width = std::min(cc.J, L.n - j0);
    cc.rows(L, j0, width, s.ptr, s.pad, s.zeros);
    dot_tiles_run(tiles, s.ptr.data(), round_up(width, 8), nullptr, s.acc.data());
  }
  std::fill(s.g.begin(), s.g.end(), 0.0);
  dot_tiles_finish(tiles, s.acc.data(), s.g.data(), cc.P);
  store_padded_gram(s.g.data(), cc.P, cc.rq, r, lowrank, gn);
}

// acc[u][v] += Σ_{q0 <= q < q1} c[u * ldc + q] (x_q[jb + 8v ..] ∘ s_v), u < 4, v < 2: four
// output rows of a coefficient matrix (c at the first) times 16 columns of the rows x_q,
// each row optionally scaled by s (SCALED). One FMA per accumulator per row.
template <bool SCALED>
inline void cols_acc(const float* const* x, const float* c, int64_t ldc, int64_t q0, int64_t q1, int64_t jb, vf8 s0,
                     vf8 s1, vf8 (&acc)[4][2]) {
  for (int64_t q = q0; q < q1; ++q) {
    vf8 x0 = load8(x[q] + jb), x1 = load8(x[q] + jb + 8);
    if (SCALED) {
      x0 *= s0;
      x1 *= s1;
    }
    pin(x0);
    pin(x1);
    for (int u = 0; u < 4; ++u) {
      const vf8 cv = bcast(c[u * ldc + q]);
      acc[u][0] += cv * x0;
      acc[u][1] += cv * x1;
    }
  }
}

void col_quad_chunk(const float* const* x, int64_t P, int64_t width, const float* U, float* out) {
  // Y[p] = Σ_{q >= p} U[p, q] x_q, out = Σ_p x_p ∘ Y[p], 16 columns at a time
  for (int64_t jb = 0; jb < width; jb += 16) {
    prefetch_rows_ahead(x, P, jb + 64, width);
    vf8 t0 = {}, t1 = {};
    for (int64_t p0 = 0; p0 < P; p0 += 4) {
      vf8 acc[4][2] = {};
      cols_acc<false>(x, U + p0 * P, P, p0, P, jb, vf8{}, vf8{}, acc);
      for (int u = 0; u < 4; ++u) {
        t0 += acc[u][0] * load8(x[p0 + u] + jb);
        t1 += acc[u][1] * load8(x[p0 + u] + jb + 8);
      }
    }
    store8(out + jb, t0);
    store8(out + jb + 8, t1);
  }
}

// U (upper, padded layout: unpadded index c maps to idx(c)) from a symmetric K [o, o]:
// U_pp = K_pp, U_pq = K_pq + K_qp above the diagonal, so Σ_{p<=q} x_p U_pq x_q = xᵀ K x.
template <typename Idx>
void fold_upper(const float* K, int64_t o, int64_t ld, Idx idx, float* U, int64_t size) {
  std::fill(U, U + size, 0.f);
  for (int64_t p = 0; p < o; ++p)
    for (int64_t q = p; q < o; ++q) U[idx(p) * ld + idx(q)] = p == q ? K[p * o + p] : K[p * o + q] + K[q * o + p];
}

// The Adafactor weights of one layer and its weighted Grams. With k_row, k_col (symmetric
// [2r, 2r]) the new sums are first folded into the state rs, cs in place with weight f.
// Writes ell [m], rho [n], bl = BᵀLB and ar = ARAᵀ ([r, r], undamped) and the means of ell
// and rho (means[0], means[1]).
void layer_weights(const Layer& L, int64_t r, const RowChunks& rc, const ColChunks& cc, const float* k_row,
                   const float* k_col, float f, float ic, float eps, float* rs, float* cs, Scratch& s, float* e,
                   float* rh, float* bl, float* ar, double* means) {
  const int64_t o = 2 * r;
  const bool measure = k_row != nullptr;
  auto row_idx = [&](int64_t c) { return c < r ? c : rc.rp + (c - r); };
  auto col_idx = [&](int64_t c) { return c < r ? c : cc.rq + (c - r); };
  // m side: [fold the new row sums], ell, BᵀLB
  if (measure) fold_upper(k_row, o, rc.C, row_idx, s.mat.data(), rc.C * rc.C);
  double r_sum = 0.0, e_sum = 0.0, rho_sum = 0.0;
  std::fill(s.g.begin(), s.g.end(), 0.0);
  rc.each(L, s.w.data(), [&](const RowBlock& blk, int64_t i0, int64_t n) {
    if (measure) {
      quad_rows(blk, s.mat.data(), rc.C, s.acc.data(), s.vec.data());
      for (int64_t i = 0; i < n; ++i) rs[i0 + i] += f * (s.vec[i] - rs[i0 + i]);
    }
    for (int64_t i = 0; i < n; ++i) {
      const float v = rs[i0 + i] * ic + eps;
      r_sum += v;
      e[i0 + i] = std::sqrt(v);
      e_sum += e[i0 + i];
    }
    const float* scale = e + i0;
    if (blk.R != n) {  // a copied tail: its padding rows need (any finite) weights
      std::fill(s.buf.begin(), s.buf.begin() + blk.R, 0.f);
      std::memcpy(s.buf.data(), e + i0, sizeof(float) * n);
      scale = s.buf.data();
    }
    gram_rows_upper(blk, rc.rp, scale, s.g.data(), rc.C);
  });
  store_sym(s.g.data(), rc.C, 0, 0, r, bl, r, 0, 0, true);
  // n side: [fold the new column sums], √ĉ, Σ_j √ĉ_j A_:j A_:jᵀ; then the 1 / √(1ᵀ r̂)
  if (measure) fold_upper(k_col, o, cc.P, col_idx, s.mat.data(), cc.P * cc.P);
  const DotTiles tiles{0, cc.rq, 0, true};  // the A rows (from row rq of the pointers)
  std::fill(s.acc.begin(), s.acc.begin() + 8 * tiles.count(), vf8{});
  for (int64_t j0 = 0; j0 < L.n; j0 += cc.J) {
    const int64_t width = std::min(cc.J, L.n - j0);
    cc.rows(L, j0, width, s.ptr, s.pad, s.zeros);
    if (measure) {
      col_quad_chunk(s.ptr.data(), cc.P, width, s.mat.data(), s.vec.data());
      for (int64_t j = 0; j < width; ++j) cs[j0 + j] += f * (s.vec[j] - cs[j0 + j]);
    }
    std::fill(s.buf.begin(), s.buf.begin() + cc.J, 0.f);
    for (int64_t j = 0; j < width; ++j) s.buf[j] = rh[j0 + j] = std::sqrt(cs[j0 + j] * ic + eps);
    dot_tiles_run(tiles, s.ptr.data() + cc.rq, round_up(width, 8), s.buf.data(), s.acc.data());
  }
  const double norm = 1.0 / std::sqrt(r_sum);
  const float fnorm = static_cast<float>(norm);
  for (int64_t j = 0; j < L.n; ++j) {
    rh[j] *= fnorm;
    rho_sum += rh[j];
  }
  means[0] = e_sum / static_cast<double>(L.m);
  means[1] = rho_sum / static_cast<double>(L.n);
  std::fill(s.g.begin(), s.g.end(), 0.0);
  dot_tiles_finish(tiles, s.acc.data(), s.g.data(), cc.P);
  for (auto& v : s.g) v *= norm;
  store_sym(s.g.data(), cc.P, 0, 0, r, ar, r, 0, 0, true);
}

void apply_step(float* __restrict p, const float* __restrict d, float* __restrict mom, int64_t n, float beta1,
                float lr, float decay) {
  if (mom == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[j] = (p[j] + lr * d[j]) * decay;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float m = mom[j] + (1.f - beta1) * (d[j] - mom[j]);
      mom[j] = m;
      p[j] = (p[j] + lr * m) * decay;
    }
  }
}

// In place: dA = left (gA / rho) + hc A, dB = (gB / ell) right + B hc ([r, r] each); then
// d <- m <- m + (1 - beta1)(d - m) when momentum buffers are given, p <- (p + lr d) * decay.
void layer_update(const Layer& L, float* ap, float* bp, int64_t r, const RowChunks& rc, const ColChunks& cc,
                  const float* e, const float* rh, const float* lf, const float* rt, const float* hc, float lr,
                  float decay, float* ma, float* mb, float beta1, Scratch& s) {
  // m side: M [C, rp] = [hc ; right] (padded)
  const int64_t rp = rc.rp;
  std::fill(s.mat.begin(), s.mat.begin() + rc.C * rp, 0.f);
  for (int64_t c = 0; c < r; ++c)
    for (int64_t q = 0; q < r; ++q) {
      s.mat[c * rp + q] = hc[c * r + q];
      s.mat[(rp + c) * rp + q] = rt[c * r + q];
    }
  rc.each(L, s.w.data(), [&](const RowBlock& blk, int64_t i0, int64_t n) {
    for (int64_t ib = 0; ib < n; ib += 6) {
      float inv_ell[6];
      for (int u = 0; u < 6; ++u) inv_ell[u] = ib + u < n ? 1.f / e[i0 + ib + u] : 0.f;
      col_blocks(0, rp, rp, [&](int64_t qb, int nv) {
        nv == 2 ? update_rows_block<2>(blk, ib, r, s.mat.data(), qb, inv_ell, s.buf.data())
                : update_rows_block<1>(blk, ib, r, s.mat.data(), qb, inv_ell, s.buf.data());
      });
      // the tile's rows are all read; now write them back
      for (int64_t u = 0; u < 6 && ib + u < n; ++u) {
        const int64_t i = i0 + ib + u;
        apply_step(bp + i * r, s.buf.data() + u * rp, mb == nullptr ? nullptr : mb + i * r, r, beta1, lr, decay);
      }
    }
  });
  // n side: dA[p, j] = Σ_q left[p, q] gA[q, j] / rho[j] + hc[p, q] A[q, j]; left and hc
  // padded to rq rows (zeros) so every 4-row tile is whole.
  const int64_t rq = cc.rq;
  float* lpad = s.mat.data();
  float* hpad = s.mat.data() + rq * r;
  std::fill(lpad, lpad + 2 * rq * r, 0.f);
  std::memcpy(lpad, lf, sizeof(float) * r * r);
  std::memcpy(hpad, hc, sizeof(float) * r * r);
  for (int64_t j0 = 0; j0 < L.n; j0 += cc.J) {
    const int64_t width = std::min(cc.J, L.n - j0);
    cc.rows(L, j0, width, s.ptr, s.pad, s.zeros);
    const float* const* x = s.ptr.data();
    std::fill(s.vec.begin(), s.vec.end(), 1.f);
    for (int64_t j = 0; j < width; ++j) s.vec[j] = 1.f / rh[j0 + j];
    for (int64_t jb = 0; jb < width; jb += 16) {
      prefetch_rows_ahead(x, cc.P, jb + 64, width);
      const vf8 i0v = load8(s.vec.data() + jb), i1v = load8(s.vec.data() + jb + 8);
      for (int64_t p0 = 0; p0 < rq; p0 += 4) {
        vf8 acc[4][2] = {};
        // two passes (gA / rho rows, then A rows): one FMA per accumulator per row, so the
        // 8 accumulator chains never wait on each other
        cols_acc<true>(x, lpad + p0 * r, r, 0, r, jb, i0v, i1v, acc);
        cols_acc<false>(x + rq, hpad + p0 * r, r, 0, r, jb, vf8{}, vf8{}, acc);
        for (int u = 0; u < 4; ++u) {
          store8(s.buf.data() + (p0 + u) * 16, acc[u][0]);
          store8(s.buf.data() + (p0 + u) * 16 + 8, acc[u][1]);
        }
      }
      // every row of this block is read; now write it back
      const int64_t cols = std::min<int64_t>(16, width - jb);
      for (int64_t p = 0; p < r; ++p) {
        const int64_t at = p * L.n + j0 + jb;
        apply_step(ap + at, s.buf.data() + p * 16, ma == nullptr ? nullptr : ma + at, cols, beta1, lr, decay);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Small dense algebra for the r×r step of each layer (row-major, leading dimension r).

// (M⁻¹ by M = LLᵀ, ok) for SPD float64 [n, n] (lower triangle read, as LAPACK's 'L');
// ok = false where a pivot is not positive or not finite, and then out is left alone.
// c, li: [n, n] scratch. L⁻¹ is built a row at a time (each row an axpy of the rows above,
// contiguous, so it vectorizes), then M⁻¹ = L⁻ᵀ L⁻¹ as a sum of outer products of its rows.
bool chol_inverse(const double* m, int64_t n, double* out, double* c, double* li) {
  for (int64_t j = 0; j < n; ++j) {
    const double* cj = c + j * n;
    double d = m[j * n + j];
#pragma omp simd reduction(- : d)
    for (int64_t t = 0; t < j; ++t) d -= cj[t] * cj[t];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    c[j * n + j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      const double* ci = c + i * n;
      double v = m[i * n + j];
#pragma omp simd reduction(- : v)
      for (int64_t t = 0; t < j; ++t) v -= ci[t] * cj[t];
      c[i * n + j] = v / ljj;
    }
  }
  // rows of X = L⁻¹: X_i = (e_i − Σ_{t<i} L_it X_t) / L_ii (X lower triangular)
  std::fill(li, li + n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double* __restrict xi = li + i * n;
    xi[i] = 1.0;
    for (int64_t t = 0; t < i; ++t) {
      const double lit = c[i * n + t];
      const double* __restrict xt = li + t * n;
#pragma omp simd
      for (int64_t q = 0; q <= t; ++q) xi[q] -= lit * xt[q];
    }
    const double inv = 1.0 / c[i * n + i];
#pragma omp simd
    for (int64_t q = 0; q <= i; ++q) xi[q] *= inv;
  }
  // M⁻¹ = Xᵀ X = Σ_t X_tᵀ X_t
  std::fill(out, out + n * n, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const double* __restrict xt = li + t * n;
    for (int64_t i = 0; i <= t; ++i) {
      const double xti = xt[i];
      double* __restrict oi = out + i * n;
#pragma omp simd
      for (int64_t q = 0; q <= t; ++q) oi[q] += xti * xt[q];
    }
  }
  return true;
}

// Z = op(X) op(Y) (+ Z when accumulate), op = transpose when tx / ty; all [r, r] float32;
// tmp: [r, r] scratch. 4 rows × 16 columns of Z per register tile (8 accumulators), the
// columns past the last whole vector one at a time.
void mm(const float* X, bool tx, const float* Y, bool ty, float* Z, int64_t r, bool accumulate, float* tmp) {
  const float* y = Y;
  if (ty) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) tmp[i * r + j] = Y[j * r + i];
    y = tmp;
  }
  auto x_at = [&](int64_t i, int64_t t) { return tx ? X[t * r + i] : X[i * r + t]; };
  const int64_t r16 = r / 16 * 16, r8 = r / 8 * 8;
  int64_t i0 = 0;
  for (; i0 + 4 <= r; i0 += 4) {
    int64_t jb = 0;
    for (; jb < r16; jb += 16) {
      vf8 acc[4][2];
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 2; ++v) acc[u][v] = accumulate ? load8(Z + (i0 + u) * r + jb + 8 * v) : vf8{};
      for (int64_t t = 0; t < r; ++t) {
        vf8 y0 = load8(y + t * r + jb), y1 = load8(y + t * r + jb + 8);
        pin(y0);
        pin(y1);
        for (int u = 0; u < 4; ++u) {
          const vf8 xv = bcast(x_at(i0 + u, t));
          acc[u][0] += xv * y0;
          acc[u][1] += xv * y1;
        }
      }
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 2; ++v) store8(Z + (i0 + u) * r + jb + 8 * v, acc[u][v]);
    }
    for (; jb < r8; jb += 8) {
      vf8 acc[4];
      for (int u = 0; u < 4; ++u) acc[u] = accumulate ? load8(Z + (i0 + u) * r + jb) : vf8{};
      for (int64_t t = 0; t < r; ++t) {
        const vf8 y0 = load8(y + t * r + jb);
        for (int u = 0; u < 4; ++u) acc[u] += bcast(x_at(i0 + u, t)) * y0;
      }
      for (int u = 0; u < 4; ++u) store8(Z + (i0 + u) * r + jb, acc[u]);
    }
    for (int64_t u = 0; u < 4; ++u)
      for (int64_t j = r8; j < r; ++j) {
        float v = accumulate ? Z[(i0 + u) * r + j] : 0.f;
        for (int64_t t = 0; t < r; ++t) v += x_at(i0 + u, t) * y[t * r + j];
        Z[(i0 + u) * r + j] = v;
      }
  }
  for (; i0 < r; ++i0)  // the last r % 4 rows
    for (int64_t j = 0; j < r; ++j) {
      float v = accumulate ? Z[i0 * r + j] : 0.f;
      for (int64_t t = 0; t < r; ++t) v += x_at(i0, t) * y[t * r + j];
      Z[i0 * r + j] = v;
    }
}

struct SmallAlgebra {
  int64_t r;
  std::vector<float> f;   // float32 work matrices, r×r each
  std::vector<double> d;  // float64 work matrices
  explicit SmallAlgebra(int64_t rank) : r(rank), f(24 * rank * rank), d(6 * rank * rank) {}
  float* F(int i) { return f.data() + i * r * r; }
  double* Dm(int i) { return d.data() + i * r * r; }
};

// (M + shift·I)⁻¹ of a float32 [r, r] M in float64: M + shift·I into w.Dm(0), its inverse
// into w.Dm(1); false where the factorization fails or the inverse is not finite.
bool shifted_inverse(const float* m, double shift, SmallAlgebra& w) {
  const int64_t r = w.r;
  double* dm = w.Dm(0);
  double* inv = w.Dm(1);
  for (int64_t i = 0; i < r * r; ++i) dm[i] = m[i];
  for (int64_t i = 0; i < r; ++i) dm[i * r + i] += shift;
  if (!chol_inverse(dm, r, inv, w.Dm(2), w.Dm(3))) return false;
  for (int64_t i = 0; i < r * r; ++i)
    if (!std::isfinite(inv[i])) return false;
  return true;
}

// (M + δI)⁻¹ into out (float32) with the torch path's "pinv" semantics: exact only when
// tr(M)·tr(M⁻¹)·r·eps < 1/2 (then pinv and the inverse coincide); false where that fails or
// the factorization does (the caller's fallback to the eigh-based pinv).
bool damped_pinv(const float* m, double damping, SmallAlgebra& w, float* out) {
  const int64_t r = w.r;
  if (!shifted_inverse(m, damping, w)) return false;
  const double *dm = w.Dm(0), *inv = w.Dm(1);
  double tr_m = 0.0, tr_inv = 0.0;
  for (int64_t i = 0; i < r; ++i) {
    tr_m += dm[i * r + i];
    tr_inv += inv[i * r + i];
  }
  const double rtol = std::numeric_limits<double>::epsilon() * static_cast<double>(r);
  if (!(tr_m * tr_inv * rtol < 0.5)) return false;
  for (int64_t i = 0; i < r * r; ++i) out[i] = static_cast<float>(inv[i]);
  return true;
}

// (M + shift·I)⁻¹ into out (float32); the identity where it fails (the torch path's
// "cholesky" rule); returns whether it succeeded.
bool damped_inverse(const float* m, double shift, SmallAlgebra& w, float* out) {
  const int64_t r = w.r;
  const bool ok = shifted_inverse(m, shift, w);
  const double* inv = w.Dm(1);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) out[i * r + j] = ok ? static_cast<float>(inv[i * r + j]) : (i == j ? 1.f : 0.f);
  return ok;
}

// The low-rank statistic's kernels K_row, K_col ([2r, 2r] each) from one layer's Grams, the
// formulas of training/optim/adaprelora.py: stat_kernels (products in float32 as there).
// Returns false where a pseudo-inverse needs the eigh-based fallback.
bool stat_kernels_layer(const float* gm, const float* gn, float scale, double damping, SmallAlgebra& w, float* k_row,
                        float* k_col) {
  const int64_t r = w.r, o = 2 * r;
  float *bb = w.F(0), *b_gb = w.F(1), *gb_gb = w.F(2), *aa = w.F(3), *ga_a = w.F(4), *ga_ga = w.F(5);
  for (int64_t p = 0; p < r; ++p)
    for (int64_t q = 0; q < r; ++q) {
      bb[p * r + q] = gm[p * o + q];
      b_gb[p * r + q] = gm[p * o + r + q];
      gb_gb[p * r + q] = gm[(r + p) * o + r + q];
      ga_ga[p * r + q] = gn[p * o + q];
      ga_a[p * r + q] = gn[p * o + r + q];
      aa[p * r + q] = gn[(r + p) * o + r + q];
    }
  float *inv_b = w.F(6), *inv_a = w.F(7), *x1 = w.F(8), *z = w.F(9), *x2 = w.F(10), *t0 = w.F(11), *m12 = w.F(12);
  float *nn = w.F(13), *row11 = w.F(14), *row21 = w.F(15), *row22 = w.F(16), *p = w.F(17), *u22 = w.F(18);
  float *col11 = w.F(19), *col12 = w.F(20), *t1 = w.F(21), *tmp = w.F(22);
  if (!damped_pinv(bb, damping, w, inv_b) || !damped_pinv(aa, damping, w, inv_a)) return false;
  const int64_t rr = r * r;
  for (int64_t i = 0; i < rr; ++i) {
    x1[i] = inv_a[i] / scale;
    z[i] = inv_b[i] / scale;
  }
  mm(inv_b, false, b_gb, false, t0, r, false, tmp);  // x2 = -(inv_b b_gb) x1
  mm(t0, false, x1, false, x2, r, false, tmp);
  for (int64_t i = 0; i < rr; ++i) x2[i] = -x2[i];
  mm(z, false, ga_a, false, m12, r, false, tmp);  // m12 = z ga_a
  mm(x2, false, aa, false, nn, r, false, tmp);    // n = m12 + x2 aa
  for (int64_t i = 0; i < rr; ++i) nn[i] += m12[i];
  mm(z, false, ga_ga, false, t0, r, false, tmp);  // row11 = z ga_ga z + x2 m12ᵀ + n x2ᵀ
  mm(t0, false, z, false, row11, r, false, tmp);
  mm(x2, false, m12, true, row11, r, true, tmp);
  mm(nn, false, x2, true, row11, r, true, tmp);
  mm(x1, false, nn, true, row21, r, false, tmp);  // row21 = x1 nᵀ
  mm(x1, false, aa, false, t0, r, false, tmp);    // row22 = x1 aa x1
  mm(t0, false, x1, false, row22, r, false, tmp);
  mm(bb, false, x2, false, p, r, false, tmp);  // p = bb x2 + b_gb x1
  mm(b_gb, false, x1, false, p, r, true, tmp);
  mm(b_gb, true, x2, false, t1, r, false, tmp);  // u22 = x2ᵀ p + x1 (b_gbᵀ x2 + gb_gb x1)
  mm(gb_gb, false, x1, false, t1, r, true, tmp);
  mm(x1, false, t1, false, u22, r, false, tmp);
  mm(x2, true, p, false, u22, r, true, tmp);
  mm(z, false, bb, false, t0, r, false, tmp);  // col11 = z bb z, col12 = z p
  mm(t0, false, z, false, col11, r, false, tmp);
  mm(z, false, p, false, col12, r, false, tmp);
  // K_row = [[row11, row21ᵀ], [row21, row22]], K_col = [[col11, col12], [col12ᵀ, u22]]
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      k_row[i * o + j] = row11[i * r + j];
      k_row[i * o + r + j] = row21[j * r + i];
      k_row[(r + i) * o + j] = row21[i * r + j];
      k_row[(r + i) * o + r + j] = row22[i * r + j];
      k_col[i * o + j] = col11[i * r + j];
      k_col[i * o + r + j] = col12[i * r + j];
      k_col[(r + i) * o + j] = col12[j * r + i];
      k_col[(r + i) * o + r + j] = u22[i * r + j];
    }
  return true;
}

// ---------------------------------------------------------------------------------------
// The op over a list of layers (one rank per call; one task per layer).

void check_momentum(const at::TensorList& mom_a, const at::TensorList& mom_b, const at::TensorList& a,
                    const at::TensorList& b) {
  TORCH_CHECK(mom_a.size() == mom_b.size(), "mom_A and mom_B must both be given or both be empty");
  if (mom_a.empty()) return;
  TORCH_CHECK(mom_a.size() == a.size(), "mom_A must list one buffer per layer");
  for (size_t l = 0; l < a.size(); ++l) {
    check_f32_contig(mom_a[l], "mom_A");
    check_f32_contig(mom_b[l], "mom_B");
    TORCH_CHECK(mom_a[l].sizes() == a[l].sizes() && mom_b[l].sizes() == b[l].sizes(), "layer ", l,
                ": momentum buffers must have the factors' shapes");
  }
}

// adapre_step: one whole AdaPreLoRA step per layer in one task, so the layer's factors come
// from memory once and stay in cache for every pass:
//   Grams → [statistic kernels (r×r) → fold] → weights, BᵀLB, ARAᵀ → damped inverses and
//   direction factors (r×r) → update.
// scales[l] = s, inv_corr[l] = 1 / (1 - β2^t), fold[l] = the EMA weight of this step's sums
// (measure: this step measures the low-rank statistic). Returns per layer 0 = stepped,
// 1 = stepped but a weighted inverse failed (the identity was used, as the torch path
// does), 2 = not touched: a pseudo-inverse of the statistic needs the eigh fallback (the
// caller steps that layer through the torch path).
at::Tensor adapre_step(at::TensorList a, at::TensorList b, at::TensorList ga, at::TensorList gb,
                       at::TensorList row_state, at::TensorList col_state, at::TensorList mom_a,
                       at::TensorList mom_b, c10::ArrayRef<double> scales, c10::ArrayRef<double> inv_corr,
                       c10::ArrayRef<double> fold, bool measure, double lr, double decay, double beta1, double eps,
                       double damping) {
  int64_t r = 0;
  const auto layers = layers_of(a, b, ga, gb, &r);
  const int64_t k = static_cast<int64_t>(layers.size()), o = 2 * r;
  check_vectors(row_state, layers, true, "row_state");
  check_vectors(col_state, layers, false, "col_state");
  check_momentum(mom_a, mom_b, a, b);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == k && static_cast<int64_t>(inv_corr.size()) == k,
              "scales and inv_corr must have one entry per layer");
  TORCH_CHECK(!measure || static_cast<int64_t>(fold.size()) == k, "fold must have one entry per layer");
  const bool momentum = !mom_a.empty();
  auto status = at::zeros({k}, a[0].options().dtype(at::kByte));
  uint8_t* st = status.data_ptr<uint8_t>();
  const RowChunks rc(r);
  const ColChunks cc(r);
  int64_t max_m = 1, max_n = 1;
  for (const auto& L : layers) {
    max_m = std::max(max_m, L.m);
    max_n = std::max(max_n, L.n);
  }
  at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {
    Scratch s(rc, cc);
    SmallAlgebra w(r);
    std::vector<float> gm(o * o), gn(o * o), k_row(o * o), k_col(o * o), e(max_m), rh(max_n);
    for (int64_t l = lo; l < hi; ++l) {
      const Layer& L = layers[l];
      const float scale = static_cast<float>(scales[l]);
      layer_grams(L, r, rc, cc, measure, s, gm.data(), gn.data());
      if (measure && !stat_kernels_layer(gm.data(), gn.data(), scale, damping, w, k_row.data(), k_col.data())) {
        st[l] = 2;
        continue;
      }
      float *bl = w.F(0), *ar = w.F(1), *inv_l = w.F(2), *inv_r = w.F(3), *left = w.F(4), *right = w.F(5);
      float *hc = w.F(6), *ga_a = w.F(7), *t0 = w.F(8), *tmp = w.F(9);
      double means[2];
      layer_weights(L, r, rc, cc, measure ? k_row.data() : nullptr, measure ? k_col.data() : nullptr,
                    measure ? static_cast<float>(fold[l]) : 0.f, static_cast<float>(inv_corr[l]),
                    static_cast<float>(eps), row_state[l].data_ptr<float>(), col_state[l].data_ptr<float>(), s,
                    e.data(), rh.data(), bl, ar, means);
      // direction factors (training/optim/adaprelora.py: direction_factors)
      const bool ok_l = damped_inverse(bl, damping * means[0], w, inv_l);
      const bool ok_r = damped_inverse(ar, damping * means[1], w, inv_r);
      if (!ok_l || !ok_r) st[l] = 1;
      const float s2 = scale * scale;
      for (int64_t p = 0; p < r; ++p)
        for (int64_t q = 0; q < r; ++q) ga_a[p * r + q] = gn[p * o + r + q];
      mm(inv_l, false, ga_a, false, t0, r, false, tmp);
      mm(t0, false, inv_r, false, hc, r, false, tmp);
      for (int64_t i = 0; i < r * r; ++i) {
        hc[i] *= 0.5f / s2;
        left[i] = -inv_l[i] / s2;
        right[i] = -inv_r[i] / s2;
      }
      layer_update(L, a[l].data_ptr<float>(), b[l].data_ptr<float>(), r, rc, cc, e.data(), rh.data(), left, right,
                   hc, static_cast<float>(lr), static_cast<float>(decay),
                   momentum ? mom_a[l].data_ptr<float>() : nullptr, momentum ? mom_b[l].data_ptr<float>() : nullptr,
                   static_cast<float>(beta1), s);
    }
  });
  return status;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorafold_cpu, m) {
  m.def(
      "adapre_step(Tensor(a!)[] A, Tensor(b!)[] B, Tensor[] gA, Tensor[] gB, Tensor(c!)[] row_state, "
      "Tensor(d!)[] col_state, Tensor(e!)[] mom_A, Tensor(f!)[] mom_B, float[] scales, float[] inv_corr, "
      "float[] fold, bool measure, float lr, float decay, float beta1, float eps, float damping) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorafold_cpu, CPU, m) {
  m.impl("adapre_step", &adapre_step);
}
