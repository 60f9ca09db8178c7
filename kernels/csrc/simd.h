// Vector helpers of lorafold's compiled CPU serving kernels (cpu_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lorafold_simd {

// GCC/Clang vector extensions (8 floats: one AVX2 register, two SSE/NEON ones), so the
// compiler cannot fail to vectorise the inner loops; unaligned loads through memcpy.
typedef float vf8 __attribute__((vector_size(32)));

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// bfloat16 weights (adapter pools at half the bytes: `--lora-dtype bfloat16`): a bfloat16
// is the high half of a float32, so widening is exact and arithmetic stays float32. Eight
// at a time by zero-extend and shift (three shuffle-port uops: the tails only); sixteen at
// a time as two vectors, the even- and the odd-indexed elements, by one shift and one mask
// of the pairs (no shuffles): the inner loops keep their other operand and their
// accumulators in the same split order and merge once at the end.
typedef uint16_t vu16x8 __attribute__((vector_size(16)));
typedef uint32_t vu32x8 __attribute__((vector_size(32)));

inline vf8 load8(const at::BFloat16* p) {
  vu16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32x8 w = __builtin_convertvector(h, vu32x8) << 16;
  vf8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// Thirty-two at a time in 512-bit vectors where the target has AVX-512 (kWideVectors): a
// bfloat16 row's whole cache line per load, half the instructions per byte of the 16-wide
// split, which frees the core's window for more loads in flight (bfloat16 rows are bound by
// memory latency, not arithmetic): the LoRA op of a 32-sequence decode step over 32 distinct
// bf16 adapters went from 20.3 to 19.1 ms (`bench_decode_step --profile`, before and after).
// Elsewhere each vf16 is two or four registers, and the 8-row tiles would spill.
#if defined(__AVX512F__)
constexpr bool kWideVectors = true;
#else
constexpr bool kWideVectors = false;
#endif
typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu32x16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

// The split loads and stores below, for V = vf8 (16 columns a step) or vf16 (32).
template <typename V>
struct SplitBits;  // the uint32 vector of V's width
template <>
struct SplitBits<vf8> {
  typedef vu32x8 type;
};
template <>
struct SplitBits<vf16> {
  typedef vu32x16 type;
};

// 2 x lanes bfloat16 as their even- and odd-indexed elements, widened: one shift, one mask.
template <typename V>
inline void load_split(const at::BFloat16* p, V& even, V& odd) {
  typename SplitBits<V>::type w;
  std::memcpy(&w, p, sizeof(w));
  const typename SplitBits<V>::type e = w << 16, o = w & 0xFFFF0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

// 16 / 32 floats as their even- and odd-indexed elements (the order of the bfloat16 split).
inline void load_split(const float* p, vf8& even, vf8& odd) {
  const vf8 lo = load8(p), hi = load8(p + 8);
  even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
  odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
}

inline void load_split(const float* p, vf16& even, vf16& odd) {
  const vf16 lo = load16(p), hi = load16(p + 16);
  even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// p[0:16] / p[0:32] += the floats held split as (even, odd).
inline void add_split(float* p, vf8 even, vf8 odd) {
  store8(p, load8(p) + __builtin_shufflevector(even, odd, 0, 8, 1, 9, 2, 10, 3, 11));
  store8(p + 8, load8(p + 8) + __builtin_shufflevector(even, odd, 4, 12, 5, 13, 6, 14, 7, 15));
}

inline void add_split(float* p, vf16 even, vf16 odd) {
  store16(p, load16(p) + __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  store16(p + 16, load16(p + 16) + __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29,
                                                           14, 30, 15, 31));
}

// A 256-bit accumulator as a V (the low half, zeros above) and back (the halves summed).
template <typename V>
inline V widen(vf8 v) {
  if constexpr (std::is_same_v<V, vf8>) {
    return v;
  } else {
    const vf8 zero = {};
    return __builtin_shufflevector(v, zero, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
}

inline vf8 fold(vf8 v) { return v; }
inline vf8 fold(vf16 v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

inline float hsum(vf8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// out[j] = sum(a[j]) for 8 vectors at once (a transpose-and-add tree of shuffles): 8 dot
// products finished for ~a quarter of the cost of 8 separate horizontal sums.
inline vf8 hsum8x8(const vf8* a) {
  vf8 v[4], w[2];
  for (int i = 0; i < 4; ++i) {  // v[i] = 4 partials of a[2i], then 4 of a[2i+1]
    v[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {  // w[i] = 2 partials each of a[4i], a[4i+2], a[4i+1], a[4i+3]
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  // z = sums of a[0], a[2], a[4], a[6], a[1], a[3], a[5], a[7]
  const vf8 z = __builtin_shufflevector(w[0], w[1], 0, 2, 8, 10, 4, 6, 12, 14) +
                __builtin_shufflevector(w[0], w[1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(z, z, 0, 4, 1, 5, 2, 6, 3, 7);
}

inline void check_f32_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace lorafold_simd
