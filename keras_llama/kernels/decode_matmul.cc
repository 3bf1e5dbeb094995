// Skinny matrix products for decoding on CPU: y[M, N] = x[M, K] @ W[K, N] for a few rows
// (M <= 8 per pass: one token per sequence of a small batch), with W pre-packed into panels.
//
// Decoding one token reads every weight once and does little arithmetic with it, so its speed
// is the speed at which the weights stream from memory. The kernels here stream each weight
// exactly once, in the order it lies in memory, with every row of x kept in registers:
//
//   packed W: [P, K, NB] float32 (or int8 plus one float scale per column), panel p holding
//   columns p*NB .. p*NB+NB-1 of W, zero-padded past N. Panel p, row k is NB contiguous values.
//
// Block-quantized weights (GGUF's Q8_0 / Q4_0 / Q4_1, Keras's int4 in blocks of 32) keep one
// scale (and, for 4 bits, one offset) per column and block of kBlock = 32 rows:
//
//   int8 blocks:  q [P, K, NB] int8,  scale [P, G, NB]              w = scale * q
//   4-bit blocks: q [P, K, NB / 2] uint8 (byte j: column j in its low nibble, column j + 16
//                 in its high nibble, unsigned 0..15), scale and offset [P, G, NB]
//                                                                   w = scale * q + offset
//
// with G = ceil(K / 32) (the last block may be short). A block's products are summed
// unscaled, then scaled once: acc += scale * sum_k x[k] q[k] (+ offset * sum_k x[k], the
// row sums of x per block, computed once per call).
//
// Panels are shared between the calling thread and XLA's intra-op thread pool through an
// atomic counter (cpu_common.h: run_panel_chunks); the caller waits only for panels other
// threads have claimed, so a helper task that starts late finds no work and never blocks it.
//
// Written with GCC/Clang vector extensions (intrinsics only to widen int8 on x86): built with -march=native, the
// 16-float vectors become AVX-512 registers (two AVX2 registers, four NEON registers, ...).
// Built and loaded at first use by keras_llama/kernels/library.py.

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers
using keras_llama::load;       // overloaded below for int8
using keras_llama::store;      // overloaded below for a partial vector

constexpr int64_t kPanel = 32;  // NB: columns per panel (two 16-float vectors)
constexpr int kMaxRows = 8;     // rows of x per pass over the weights

typedef int8_t i8x16u __attribute__((vector_size(16), aligned(1)));

inline f32x16 load(const int8_t* p) {
  // Sign-extend 16 int8 to int32, then convert to float. GCC scalarizes the generic
  // int8 -> int32 vector conversion, so x86 gets the one-instruction forms explicitly.
#if defined(__AVX512F__)
  // The zero-masking forms with every lane selected: the same instructions as the plain
  // forms, whose `_mm512_undefined_*` pass-through GCC 12 flags as maybe-uninitialized.
  const __m512i wide = _mm512_maskz_cvtepi8_epi32(
      static_cast<__mmask16>(0xFFFF), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 f = _mm512_maskz_cvtepi32_ps(static_cast<__mmask16>(0xFFFF), wide);
  f32x16 out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
  f32x16 out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  const i32x16 wide = __builtin_convertvector(*reinterpret_cast<const i8x16u*>(p), i32x16);
  return __builtin_convertvector(wide, f32x16);
#endif
}

inline void store(float* p, f32x16 v, int64_t count) {
  if (count >= 16) {
    *reinterpret_cast<f32x16u*>(p) = v;
  } else if (count > 0) {
    std::memcpy(p, &v, count * sizeof(float));
  }
}

// Rows [0, M) of x (row stride K) times one panel; writes columns [n0, n0 + cols) of y.
template <int M, typename W>
void panel_product(const float* x, int64_t K, const W* panel, const float* scale, float* y,
                   int64_t ldy, int64_t n0, int64_t cols) {
  f32x16 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f32x16{};
  for (int64_t k = 0; k < K; ++k) {
    const f32x16 w0 = load(panel + k * kPanel);
    const f32x16 w1 = load(panel + k * kPanel + 16);
    for (int m = 0; m < M; ++m) {
      const float xv = x[m * K + k];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  if (scale != nullptr) {
    const f32x16 s0 = load(scale + n0);
    const f32x16 s1 = load(scale + n0 + 16);
    for (int m = 0; m < M; ++m) {
      acc[m][0] *= s0;
      acc[m][1] *= s1;
    }
  }
  for (int m = 0; m < M; ++m) {
    store(y + m * ldy + n0, acc[m][0], cols);
    store(y + m * ldy + n0 + 16, acc[m][1], cols - 16);
  }
}

// --- block-quantized panels -----------------------------------------------------------------
constexpr int64_t kBlock = 32;  // rows per scale (and offset)

typedef uint8_t u8x16u __attribute__((vector_size(16), aligned(1)));

// 32 unsigned 4-bit values (16 bytes: low nibbles are columns 0..15, high nibbles 16..31).
inline void load_nibbles(const uint8_t* p, f32x16* lo, f32x16* hi) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_maskz_cvtepu8_epi32(
      static_cast<__mmask16>(0xFFFF), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mask = _mm512_set1_epi32(15);
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);  // zero-masking forms: see load()
  const __m512 l = _mm512_maskz_cvtepi32_ps(all, _mm512_maskz_and_epi32(all, wide, mask));
  const __m512 h = _mm512_maskz_cvtepi32_ps(all, _mm512_maskz_srli_epi32(all, wide, 4));
  std::memcpy(lo, &l, sizeof(*lo));
  std::memcpy(hi, &h, sizeof(*hi));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i mask = _mm256_set1_epi32(15);
  const __m256i a = _mm256_cvtepu8_epi32(bytes);
  const __m256i b = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256 parts[4] = {
      _mm256_cvtepi32_ps(_mm256_and_si256(a, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(b, mask)),
      _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
  std::memcpy(lo, &parts[0], 32);
  std::memcpy(reinterpret_cast<char*>(lo) + 32, &parts[1], 32);
  std::memcpy(hi, &parts[2], 32);
  std::memcpy(reinterpret_cast<char*>(hi) + 32, &parts[3], 32);
#else
  const i32x16 wide = __builtin_convertvector(*reinterpret_cast<const u8x16u*>(p), i32x16);
  *lo = __builtin_convertvector(wide & 15, f32x16);
  *hi = __builtin_convertvector(wide >> 4, f32x16);
#endif
}

// One 32-column row of a block-quantized panel as two 16-float vectors.
inline void load_row(const int8_t* panel, int64_t k, f32x16* w0, f32x16* w1) {
  *w0 = load(panel + k * kPanel);
  *w1 = load(panel + k * kPanel + 16);
}

inline void load_row(const uint8_t* panel, int64_t k, f32x16* w0, f32x16* w1) {
  load_nibbles(panel + k * (kPanel / 2), w0, w1);
}

// Rows [0, M) of x times one block-quantized panel (int8_t: int8 blocks, uint8_t: 4-bit
// blocks); ``scale``/``offset`` [G, kPanel] for this panel (offset nullptr for int8);
// ``xsum`` [M, G] the block sums of x (4-bit only).
template <int M, typename Q>
void block_panel_product(const float* x, int64_t K, const Q* panel, const float* scale,
                         const float* offset, const float* xsum, int64_t groups, float* y,
                         int64_t ldy, int64_t n0, int64_t cols) {
  f32x16 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f32x16{};
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * kBlock, k1 = std::min(K, k0 + kBlock);
    f32x16 part[M][2];
    for (int m = 0; m < M; ++m) part[m][0] = part[m][1] = f32x16{};
    for (int64_t k = k0; k < k1; ++k) {
      f32x16 w0, w1;
      load_row(panel, k, &w0, &w1);
      for (int m = 0; m < M; ++m) {
        const float xv = x[m * K + k];
        part[m][0] += xv * w0;
        part[m][1] += xv * w1;
      }
    }
    const f32x16 s0 = load(scale + g * kPanel), s1 = load(scale + g * kPanel + 16);
    for (int m = 0; m < M; ++m) {
      acc[m][0] += s0 * part[m][0];
      acc[m][1] += s1 * part[m][1];
    }
    if (offset != nullptr) {
      const f32x16 o0 = load(offset + g * kPanel), o1 = load(offset + g * kPanel + 16);
      for (int m = 0; m < M; ++m) {
        const float xs = xsum[m * groups + g];
        acc[m][0] += xs * o0;
        acc[m][1] += xs * o1;
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    store(y + m * ldy + n0, acc[m][0], cols);
    store(y + m * ldy + n0 + 16, acc[m][1], cols - 16);
  }
}

// Bytes of one panel row: 32 int8, or 16 bytes of 4-bit pairs.
template <typename Q>
constexpr int64_t row_bytes() {
  return std::is_same<Q, uint8_t>::value ? kPanel / 2 : kPanel;
}

template <typename Q>
ffi::Error run_block_product(ffi::ThreadPool& pool, const float* x, const Q* packed,
                             const float* scale, const float* offset, float* y, int64_t M,
                             int64_t K, int64_t N, int64_t panels) {
  if (panels * kPanel < N) {
    return ffi::Error::InvalidArgument("packed weights hold fewer columns than n");
  }
  const int64_t G = (K + kBlock - 1) / kBlock;
  std::vector<float> xsum;  // [M, G]: block sums of x, for the offsets (4-bit only)
  if (offset != nullptr) {
    xsum.assign(M * G, 0.0f);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xsum[m * G + k / kBlock] += x[m * K + k];
    }
  }
  const auto body = [=, xsum = std::move(xsum)](int64_t first, int64_t last) {
    for (int64_t r = 0; r < M; r += kMaxRows) {
      const float* sums = xsum.empty() ? nullptr : xsum.data() + r * G;
      with_rows(M - r, [&](auto rows) {
        for (int64_t p = first; p < last; ++p) {
          const int64_t n0 = p * kPanel;
          block_panel_product<decltype(rows)::value, Q>(
              x + r * K, K, packed + p * K * row_bytes<Q>(), scale + p * G * kPanel,
              offset == nullptr ? nullptr : offset + p * G * kPanel, sums, G, y + r * N, N, n0,
              std::min(kPanel, N - n0));
        }
      });
    }
  };
  run_panel_chunks(pool, (N + kPanel - 1) / kPanel, K * row_bytes<Q>(), body);
  return ffi::Error::Success();
}

template <typename W>
ffi::Error run_product(ffi::ThreadPool& pool, const float* x, const W* packed,
                       const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                       int64_t panels) {
  if (panels * kPanel < N) {
    return ffi::Error::InvalidArgument("packed weights hold fewer columns than n");
  }
  const auto body = [=](int64_t first, int64_t last) {
    for (int64_t r = 0; r < M; r += kMaxRows) {
      with_rows(M - r, [&](auto rows) {
        for (int64_t p = first; p < last; ++p) {
          const int64_t n0 = p * kPanel;
          panel_product<decltype(rows)::value, W>(x + r * K, K, packed + p * K * kPanel, scale,
                                                  y + r * N, N, n0, std::min(kPanel, N - n0));
        }
      });
    }
  };
  run_panel_chunks(pool, (N + kPanel - 1) / kPanel, K * kPanel * sizeof(W), body);
  return ffi::Error::Success();
}

ffi::Error decode_matmul_f32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> packed, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != kPanel ||
      pd[1] != xd[1] || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("decode_matmul_f32: expected x [M, K], packed [P, K, 32], y [M, N]");
  }
  return run_product<float>(pool, x.typed_data(), packed.typed_data(), nullptr,
                            y->typed_data(), xd[0], xd[1], yd[1], pd[0]);
}

ffi::Error decode_matmul_i8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> scale,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != kPanel ||
      pd[1] != xd[1] || yd[0] != xd[0] || static_cast<int64_t>(scale.element_count()) != pd[0] * kPanel) {
    return ffi::Error::InvalidArgument(
        "decode_matmul_i8: expected x [M, K], packed [P, K, 32], scale [P * 32], y [M, N]");
  }
  return run_product<int8_t>(pool, x.typed_data(), packed.typed_data(), scale.typed_data(),
                             y->typed_data(), xd[0], xd[1], yd[1], pd[0]);
}

bool block_shapes_ok(const ffi::Span<const int64_t>& xd, const ffi::Span<const int64_t>& pd,
                     const ffi::Span<const int64_t>& yd, int64_t row, size_t scale_count,
                     size_t offset_count) {
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != row || pd[1] != xd[1] ||
      yd[0] != xd[0]) {
    return false;
  }
  const int64_t groups = (xd[1] + kBlock - 1) / kBlock;
  const size_t expected = static_cast<size_t>(pd[0] * groups * kPanel);
  return scale_count == expected && (offset_count == 0 || offset_count == expected);
}

ffi::Error decode_matmul_q8_blocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> scale,
                                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!block_shapes_ok(xd, pd, yd, kPanel, scale.element_count(), 0)) {
    return ffi::Error::InvalidArgument(
        "decode_matmul_q8_blocks: expected x [M, K], packed [P, K, 32], scale "
        "[P, ceil(K / 32), 32], y [M, N]");
  }
  return run_block_product<int8_t>(pool, x.typed_data(), packed.typed_data(), scale.typed_data(),
                                   nullptr, y->typed_data(), xd[0], xd[1], yd[1], pd[0]);
}

ffi::Error decode_matmul_q4_blocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scale,
                                   ffi::Buffer<ffi::F32> offset,
                                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!block_shapes_ok(xd, pd, yd, kPanel / 2, scale.element_count(), offset.element_count()) ||
      offset.element_count() != scale.element_count()) {
    return ffi::Error::InvalidArgument(
        "decode_matmul_q4_blocks: expected x [M, K], packed [P, K, 16], scale and offset "
        "[P, ceil(K / 32), 32], y [M, N]");
  }
  return run_block_product<uint8_t>(pool, x.typed_data(), packed.typed_data(),
                                    scale.typed_data(), offset.typed_data(), y->typed_data(),
                                    xd[0], xd[1], yd[1], pd[0]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeMatmulF32, decode_matmul_f32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeMatmulI8, decode_matmul_i8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeMatmulQ8Blocks, decode_matmul_q8_blocks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeMatmulQ4Blocks, decode_matmul_q4_blocks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
