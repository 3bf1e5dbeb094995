// Integer dot products of block-quantized weights: each call first quantizes its input rows
// to int16 in blocks of 32 values (one float scale per block: d = max|x| / 32767, q = x / d
// rounded half to even; each value within 2^-16 of its block's largest), then multiplies
// 16-bit integers, and scales each block's integer sum once. Rounding the input to 16 bits
// costs nothing measurable in accuracy, where int8 inputs (llama.cpp's way) move a real
// model's logits by about 1%. y[M, N] = x[M, K] @ W[K, N] for a few rows (decoding) or many.
//
// Weights keep their stored integers, with one scale d (and, for 4 bits, one offset o) per
// column and block of 32 rows:
//
//   int8 blocks (GGUF Q8_0):          q in -127..127,  w = d * q
//   4-bit blocks (GGUF Q4_0 / Q4_1):  u in 0..15,      w = d * u + o   (Q4_0: o = -8 d)
//
// For a block of input x = dx * qx (qx int16) the product is
//   int8:  sum_k w x = d dx sum_k q qx
//   4-bit: sum_k w x = d dx sum_k u qx + o dx sum_k qx
//
// Packed layout, panel p of 32 columns (zero-padded past N), block g of 32 rows (zero past K),
// pair j of 2 rows (k = 32 g + 2 j + r):
//   int8:  bytes [P, G, 16, 64]: byte c * 2 + r of a pair is column c's row r (c = 0..31)
//   4-bit: bytes [P, G, 16, 32]: byte c * 2 + r holds column c (low nibble) and c + 16 (high)
//   scale (and offset) [P, G, 32] float16, as GGUF stores them (widened to float32 on load:
//   20 bytes per 32 four-bit weights instead of 24 with float32).
// 32 bytes of a pair widen to 32 int16 = one VPDPWSSD operand (16 columns x 2 rows), against
// the 2 input values of that pair broadcast to every lane.
//
// Panels are shared with XLA's intra-op pool as in decode_matmul.cc (cpu_common.h:
// run_panel_chunks).
// Built with -march=native: AVX-512 VNNI, else AVX-VNNI (two 256-bit halves), else portable
// vector code with the same results (every path sums the same integers exactly).

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "halves.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr int64_t kPanel = 32;  // columns per panel
constexpr int64_t kBlock = 32;  // rows per scale, and per block of quantized input
constexpr int64_t kPairs = kBlock / 2;
constexpr int kMaxRows = 8;  // input rows per pass over a panel

typedef int16_t i16x32 __attribute__((vector_size(64)));
typedef int8_t i8x32u __attribute__((vector_size(32), aligned(1)));
typedef uint8_t u8x32u __attribute__((vector_size(32), aligned(1)));

// 32 int8 -> int16 (sign-extended), and 32 bytes of nibble pairs -> low and high nibbles.
inline i16x32 widen(const int8_t* p) {
#if defined(__AVX512BW__)
  return (i16x32)_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return __builtin_convertvector(*reinterpret_cast<const i8x32u*>(p), i16x32);
#endif
}

inline void widen_nibbles(const uint8_t* p, i16x32* lo, i16x32* hi) {
#if defined(__AVX512BW__)
  const i16x32 bytes =
      (i16x32)_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const i16x32 bytes = __builtin_convertvector(*reinterpret_cast<const u8x32u*>(p), i16x32);
#endif
  *lo = bytes & 15;
  *hi = bytes >> 4;
}

// acc[i] += a[2 i] * b[0] + a[2 i + 1] * b[1], b the 2 int16 of ``b2``.
inline i32x16 dot2(i32x16 acc, i16x32 a, int32_t b2) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return (i32x16)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)a, _mm512_set1_epi32(b2));
#elif defined(__AVXVNNI__)
  __m256i lo, hi, alo, ahi;
  std::memcpy(&lo, &acc, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&acc) + 32, 32);
  std::memcpy(&alo, &a, 32);
  std::memcpy(&ahi, reinterpret_cast<const char*>(&a) + 32, 32);
  const __m256i b = _mm256_set1_epi32(b2);
  lo = _mm256_dpwssd_avx_epi32(lo, alo, b);
  hi = _mm256_dpwssd_avx_epi32(hi, ahi, b);
  i32x16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  int16_t b[2];
  std::memcpy(b, &b2, 4);
  for (int i = 0; i < 16; ++i) acc[i] += a[2 * i] * b[0] + a[2 * i + 1] * b[1];
  return acc;
#endif
}

inline f32x16 to_float(i32x16 v) { return __builtin_convertvector(v, f32x16); }

// The input quantized: qx [M, G * 32] int16 (zero past K), dx [M, G] its block scales, sx
// [M, G] the sums of each block's qx.
struct QuantizedRows {
  std::vector<int16_t> qx;
  std::vector<float> dx;
  std::vector<int32_t> sx;
};

// One block of up to 32 input values -> int16 (rounded half to even), the scale kept in
// float32. Returns the sum of the int16 values.
inline int32_t quantize_block(const float* v, int64_t count, int16_t* q, float* scale) {
#if defined(__AVX512F__)
  if (count == kBlock) {
    // The zero-masking forms with every lane selected: the plain forms' undefined
    // pass-through operands trip GCC 12's maybe-uninitialized warning.
    const __mmask16 all = static_cast<__mmask16>(0xFFFF);
    const f32x16 a = load(v), b = load(v + 16);
    const f32x16 abs_a = a < 0 ? -a : a, abs_b = b < 0 ? -b : b;
    const float d = hmax(abs_a > abs_b ? abs_a : abs_b) / 32767.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const f32x16 va = a * id, vb = b * id;
    __m512 xa, xb;
    std::memcpy(&xa, &va, sizeof(xa));
    std::memcpy(&xb, &vb, sizeof(xb));
    // Round to nearest even (the default MXCSR mode), as std::nearbyint below.
    const __m512i qa = _mm512_maskz_cvtps_epi32(all, xa);
    const __m512i qb = _mm512_maskz_cvtps_epi32(all, xb);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_maskz_cvtsepi32_epi16(all, qa));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), _mm512_maskz_cvtsepi32_epi16(all, qb));
    int32_t sums[16];
    _mm512_storeu_si512(sums, _mm512_add_epi32(qa, qb));
    int32_t sum = 0;
    for (int32_t part : sums) sum += part;
    *scale = d;
    return sum;
  }
#endif
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 32767.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    q[i] = static_cast<int16_t>(std::nearbyint(v[i] * id));
    sum += q[i];
  }
  *scale = d;
  return sum;
}

// Quantizes the rows in chunks shared with XLA's pool (a prefill's many rows; a few decoding
// rows stay on the calling thread: a chunk is at least 64 KB of input).
void quantize_rows(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t G,
                   QuantizedRows* out) {
  const int64_t padded = G * kBlock;
  out->qx.assign(M * padded, 0);
  out->dx.resize(M * G);
  out->sx.resize(M * G);
  int16_t* qx = out->qx.data();
  float* dx = out->dx.data();
  int32_t* sx = out->sx.data();
  const auto rows = [=](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t count = std::min(kBlock, K - g * kBlock);
        sx[m * G + g] = quantize_block(x + m * K + g * kBlock, count, qx + m * padded + g * kBlock,
                                       dx + m * G + g);
      }
    }
  };
  run_panel_chunks(pool, M, K * static_cast<int64_t>(sizeof(float)), rows);
}

// Rows [0, M) of the quantized input times one panel; writes columns [n0, n0 + cols) of y.
// kFour: 4-bit blocks (with offsets), else int8 blocks.
template <int M, bool kFour>
void panel_product(const QuantizedRows& in, int64_t row0, int64_t G, const uint8_t* panel,
                   const uint16_t* scale, const uint16_t* offset, float* y, int64_t ldy,
                   int64_t n0, int64_t cols) {
  constexpr int64_t kPairBytes = kFour ? 32 : 64;
  constexpr int kChains = M == 1 ? 4 : (M <= 3 ? 2 : 1);
  const int64_t padded = G * kBlock;
  f32x16 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f32x16{};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* block = panel + g * kPairs * kPairBytes;
    // kChains independent sums per row and half: a dot instruction waits for the previous
    // one on its accumulator (about 5 cycles), so few rows need several chains to keep busy.
    i32x16 sum[M][2];
    i32x16 chain[M][2][kChains];
    for (int m = 0; m < M; ++m) {
      for (int c = 0; c < kChains; ++c) chain[m][0][c] = chain[m][1][c] = i32x16{};
    }
    // Unrolled, so that each chain is a register (a chain in memory waits on its store).
#pragma GCC unroll 16
    for (int64_t j = 0; j < kPairs; ++j) {
      i16x32 a0, a1;
      if (kFour) {
        widen_nibbles(block + j * kPairBytes, &a0, &a1);
      } else {
        const int8_t* bytes = reinterpret_cast<const int8_t*>(block + j * kPairBytes);
        a0 = widen(bytes);
        a1 = widen(bytes + 32);
      }
      const int c = static_cast<int>(j % kChains);
      for (int m = 0; m < M; ++m) {
        int32_t b2;
        std::memcpy(&b2, in.qx.data() + (row0 + m) * padded + g * kBlock + 2 * j, 4);
        chain[m][0][c] = dot2(chain[m][0][c], a0, b2);
        chain[m][1][c] = dot2(chain[m][1][c], a1, b2);
      }
    }
    for (int m = 0; m < M; ++m) {
      sum[m][0] = chain[m][0][0];
      sum[m][1] = chain[m][1][0];
      for (int c = 1; c < kChains; ++c) {
        sum[m][0] += chain[m][0][c];
        sum[m][1] += chain[m][1][c];
      }
    }
    const f32x16 d0 = load_halves(scale + g * kPanel), d1 = load_halves(scale + g * kPanel + 16);
    if (kFour) {
      const f32x16 o0 = load_halves(offset + g * kPanel);
      const f32x16 o1 = load_halves(offset + g * kPanel + 16);
      for (int m = 0; m < M; ++m) {
        const float dx = in.dx[(row0 + m) * G + g];
        const float ox = dx * static_cast<float>(in.sx[(row0 + m) * G + g]);
        acc[m][0] += to_float(sum[m][0]) * (d0 * dx) + o0 * ox;
        acc[m][1] += to_float(sum[m][1]) * (d1 * dx) + o1 * ox;
      }
    } else {
      for (int m = 0; m < M; ++m) {
        const float dx = in.dx[(row0 + m) * G + g];
        acc[m][0] += to_float(sum[m][0]) * (d0 * dx);
        acc[m][1] += to_float(sum[m][1]) * (d1 * dx);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    float* row = y + (row0 + m) * ldy + n0;
    if (cols >= kPanel) {
      store(row, acc[m][0]);
      store(row + 16, acc[m][1]);
    } else {
      float part[kPanel];
      std::memcpy(part, &acc[m][0], sizeof(acc[m][0]));
      std::memcpy(part + 16, &acc[m][1], sizeof(acc[m][1]));
      std::memcpy(row, part, cols * sizeof(float));
    }
  }
}

template <bool kFour>
ffi::Error run_product(ffi::ThreadPool& pool, const float* x, const uint8_t* packed,
                       const uint16_t* scale, const uint16_t* offset, float* y, int64_t M,
                       int64_t K, int64_t N) {
  const int64_t G = (K + kBlock - 1) / kBlock;
  QuantizedRows in;
  quantize_rows(pool, x, M, K, G, &in);
  const int64_t panel_bytes = G * kPairs * (kFour ? 32 : 64);
  // Each chunk's weights are reused from cache by every group of up to 8 input rows.
  const auto body = [=, in = std::move(in)](int64_t first, int64_t last) {
    for (int64_t r = 0; r < M; r += kMaxRows) {
      with_rows(M - r, [&](auto rows) {
        for (int64_t p = first; p < last; ++p) {
          const int64_t n0 = p * kPanel;
          panel_product<decltype(rows)::value, kFour>(
              in, r, G, packed + p * panel_bytes, scale + p * G * kPanel,
              offset == nullptr ? nullptr : offset + p * G * kPanel, y, N, n0,
              std::min(kPanel, N - n0));
        }
      });
    }
  };
  run_panel_chunks(pool, (N + kPanel - 1) / kPanel, panel_bytes, body);
  return ffi::Error::Success();
}

// x [M, K], packed [P, G, 16, pair bytes], scale (offset) [P, G, 32] float16, y [M, N].
bool shapes_ok(const ffi::Span<const int64_t>& xd, const ffi::Span<const int64_t>& pd,
               const ffi::Span<const int64_t>& yd, int64_t pair_bytes, size_t scale_count) {
  if (xd.size() != 2 || pd.size() != 4 || yd.size() != 2 || yd[0] != xd[0]) return false;
  const int64_t groups = (xd[1] + kBlock - 1) / kBlock;
  const int64_t panels = (yd[1] + kPanel - 1) / kPanel;
  return pd[0] == panels && pd[1] == groups && pd[2] == kPairs && pd[3] == pair_bytes &&
         scale_count == static_cast<size_t>(panels * groups * kPanel);
}

ffi::Error q8_blocks_int16_dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F16> scale,
                               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!shapes_ok(xd, pd, yd, 64, scale.element_count())) {
    return ffi::Error::InvalidArgument(
        "q8_blocks_int16_dot: expected x [M, K], packed [ceil(N / 32), ceil(K / 32), 16, 64], "
        "scale [ceil(N / 32), ceil(K / 32), 32] float16, y [M, N]");
  }
  return run_product<false>(pool, x.typed_data(),
                            reinterpret_cast<const uint8_t*>(packed.typed_data()),
                            reinterpret_cast<const uint16_t*>(scale.untyped_data()), nullptr,
                            y->typed_data(), xd[0], xd[1], yd[1]);
}

ffi::Error q4_blocks_int16_dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F16> scale,
                               ffi::Buffer<ffi::F16> offset, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!shapes_ok(xd, pd, yd, 32, scale.element_count()) ||
      offset.element_count() != scale.element_count()) {
    return ffi::Error::InvalidArgument(
        "q4_blocks_int16_dot: expected x [M, K], packed [ceil(N / 32), ceil(K / 32), 16, 32], "
        "scale and offset [ceil(N / 32), ceil(K / 32), 32] float16, y [M, N]");
  }
  return run_product<true>(pool, x.typed_data(), packed.typed_data(),
                           reinterpret_cast<const uint16_t*>(scale.untyped_data()),
                           reinterpret_cast<const uint16_t*>(offset.untyped_data()),
                           y->typed_data(), xd[0], xd[1], yd[1]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaQ8BlocksInt16Dot, q8_blocks_int16_dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaQ4BlocksInt16Dot, q4_blocks_int16_dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
