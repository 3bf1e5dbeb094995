// float16 -> float32 for the native kernels (block scales in block_dot.cc, float16 key/value
// caches in decode_attention.cc): F16C / AVX-512 conversions where the build has them, else
// exact C++ (subnormals, infinities and NaNs included). The conversion is exact either way.

#ifndef KERAS_LLAMA_KERNELS_HALVES_H_
#define KERAS_LLAMA_KERNELS_HALVES_H_

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <cmath>

#include "cpu_common.h"

namespace keras_llama {

#if !defined(__AVX512F__) && !defined(__F16C__)
// One float16 (its bits) -> float32, subnormals, infinities and NaNs included.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13)
                                               : ((exponent + 112) << 23) | (mantissa << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif

// 16 float16 (their bits) -> float32.
inline f32x16 load_halves(const uint16_t* p) {
#if defined(__AVX512F__)
  // The zero-masked form: GCC 12 warns that the plain one's "undefined" start is uninitialized.
  return (f32x16)_mm512_maskz_cvtph_ps(0xFFFF,
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  f32x16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  f32x16 out;
  for (int i = 0; i < 16; ++i) out[i] = half_to_float(p[i]);
  return out;
#endif
}

}  // namespace keras_llama

#endif  // KERAS_LLAMA_KERNELS_HALVES_H_
