// Integer dot products of block-quantized weights, the way llama.cpp computes them: each call
// first quantizes its input rows to int8 in blocks of 32 values (one float scale per block:
// d = max|x| / 127, q = x / d rounded half to even), then multiplies 8-bit integers, and
// scales each block's integer sum once. y[M, N] = x[M, K] @ W[K, N] for a few rows (decoding) or many (a prompt).
//
// Weights are unsigned bytes u with one scale d (and, for 4 bits, one offset o) per column and
// block of 32 rows, so one instruction kind serves both formats (x86's VPDPBUSD multiplies
// unsigned by signed bytes, four pairs per 32-bit lane):
//
//   int8 blocks (GGUF Q8_0):          u = q + 128 (0..255),  w = d * (u - 128)
//   4-bit blocks (GGUF Q4_0 / Q4_1):  u in 0..15,            w = d * u + o   (Q4_0: o = -8 d)
//
// For a block of input x = dx * qx (qx int8) the product is
//   int8:  sum_k w x = d dx (sum_k u qx - 128 sum_k qx)
//   4-bit: sum_k w x = d dx sum_k u qx + o dx sum_k qx
//
// Packed layout, panel p of 32 columns (zero-padded past N), block g of 32 rows (zero past K),
// quad j of 4 rows (k = 32 g + 4 j + r):
//   int8:  bytes [P, G, 8, 128]: byte c * 4 + r of a quad is column c's row r (c = 0..31)
//   4-bit: bytes [P, G, 8, 64]:  byte c * 4 + r holds column c (low nibble) and c + 16 (high)
//   scale (and offset) [P, G, 32] float32.
// One 64-byte load is then one VPDPBUSD operand (16 columns x 4 rows), against the 4 input
// bytes of that quad broadcast to every lane.
//
// Work is shared with XLA's intra-op pool as in decode_matmul.cc (cpu_common.h: run_shared).
// Built with -march=native: AVX-512 VNNI, else AVX-VNNI (two 256-bit halves), else portable
// vector code with the same results (every path sums the same integers exactly).

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr int64_t kPanel = 32;  // columns per panel
constexpr int64_t kBlock = 32;  // rows per scale, and per block of quantized input
constexpr int64_t kQuads = kBlock / 4;
constexpr int kMaxRows = 8;  // input rows per pass over a panel

typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef uint8_t u8x64u __attribute__((vector_size(64), aligned(1)));

inline u8x64 load_bytes(const uint8_t* p) { return *reinterpret_cast<const u8x64u*>(p); }

// acc[i] += sum_r a[4 i + r] * b[r], a unsigned, b the 4 signed bytes of ``b4``.
inline i32x16 dot4(i32x16 acc, u8x64 a, int32_t b4) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)a, _mm512_set1_epi32(b4));
#elif defined(__AVXVNNI__)
  __m256i lo, hi, alo, ahi;
  std::memcpy(&lo, &acc, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&acc) + 32, 32);
  std::memcpy(&alo, &a, 32);
  std::memcpy(&ahi, reinterpret_cast<const char*>(&a) + 32, 32);
  const __m256i b = _mm256_set1_epi32(b4);
  lo = _mm256_dpbusd_avx_epi32(lo, alo, b);
  hi = _mm256_dpbusd_avx_epi32(hi, ahi, b);
  i32x16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  int8_t b[4];
  std::memcpy(b, &b4, 4);
  for (int i = 0; i < 16; ++i) {
    acc[i] += a[4 * i] * b[0] + a[4 * i + 1] * b[1] + a[4 * i + 2] * b[2] + a[4 * i + 3] * b[3];
  }
  return acc;
#endif
}

inline f32x16 to_float(i32x16 v) { return __builtin_convertvector(v, f32x16); }

// The input quantized: qx [M, G * 32] int8 (zero past K), dx [M, G] its block scales, sx
// [M, G] the sums of each block's qx.
struct QuantizedRows {
  std::vector<int8_t> qx;
  std::vector<float> dx;
  std::vector<int32_t> sx;
};

// One block of up to 32 input values -> int8 (llama.cpp's quantize_row_q8_0 as its x86 code
// rounds: half to even), the scale kept in float32. Returns the sum of the int8 values.
inline int32_t quantize_block(const float* v, int64_t count, int8_t* q, float* scale) {
#if defined(__AVX512F__)
  if (count == kBlock) {
    // The zero-masking forms with every lane selected: the plain forms' undefined
    // pass-through operands trip GCC 12's maybe-uninitialized warning.
    const __mmask16 all = static_cast<__mmask16>(0xFFFF);
    const f32x16 a = load(v), b = load(v + 16);
    const f32x16 abs_a = a < 0 ? -a : a, abs_b = b < 0 ? -b : b;
    const float d = hmax(abs_a > abs_b ? abs_a : abs_b) / 127.0f;
    const f32x16 va = a * (d != 0.0f ? 1.0f / d : 0.0f), vb = b * (d != 0.0f ? 1.0f / d : 0.0f);
    __m512 xa, xb;
    std::memcpy(&xa, &va, sizeof(xa));
    std::memcpy(&xb, &vb, sizeof(xb));
    // Round to nearest even (the default MXCSR mode), as std::nearbyint below.
    const __m512i qa = _mm512_maskz_cvtps_epi32(all, xa);
    const __m512i qb = _mm512_maskz_cvtps_epi32(all, xb);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_maskz_cvtsepi32_epi8(all, qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_maskz_cvtsepi32_epi8(all, qb));
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
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
    sum += q[i];
  }
  *scale = d;
  return sum;
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, QuantizedRows* out) {
  const int64_t padded = G * kBlock;
  out->qx.assign(M * padded, 0);
  out->dx.resize(M * G);
  out->sx.resize(M * G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t count = std::min(kBlock, K - g * kBlock);
      out->sx[m * G + g] = quantize_block(x + m * K + g * kBlock, count,
                                          out->qx.data() + m * padded + g * kBlock,
                                          out->dx.data() + m * G + g);
    }
  }
}

// Rows [0, M) of the quantized input times one panel; writes columns [n0, n0 + cols) of y.
// kFour: 4-bit blocks (with offsets), else int8 blocks.
template <int M, bool kFour>
void panel_product(const QuantizedRows& in, int64_t row0, int64_t G, const uint8_t* panel,
                   const float* scale, const float* offset, float* y, int64_t ldy, int64_t n0,
                   int64_t cols) {
  constexpr int64_t kQuadBytes = kFour ? 64 : 128;
  const int64_t padded = G * kBlock;
  f32x16 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f32x16{};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* block = panel + g * kQuads * kQuadBytes;
    i32x16 sum[M][2];
    for (int m = 0; m < M; ++m) sum[m][0] = sum[m][1] = i32x16{};
    for (int64_t j = 0; j < kQuads; ++j) {
      u8x64 a0, a1;
      if (kFour) {
        const u8x64 bytes = load_bytes(block + j * kQuadBytes);
        a0 = bytes & 15;
        a1 = bytes >> 4;
      } else {
        a0 = load_bytes(block + j * kQuadBytes);
        a1 = load_bytes(block + j * kQuadBytes + 64);
      }
      for (int m = 0; m < M; ++m) {
        int32_t b4;
        std::memcpy(&b4, in.qx.data() + (row0 + m) * padded + g * kBlock + 4 * j, 4);
        sum[m][0] = dot4(sum[m][0], a0, b4);
        sum[m][1] = dot4(sum[m][1], a1, b4);
      }
    }
    const f32x16 d0 = load(scale + g * kPanel), d1 = load(scale + g * kPanel + 16);
    if (kFour) {
      const f32x16 o0 = load(offset + g * kPanel), o1 = load(offset + g * kPanel + 16);
      for (int m = 0; m < M; ++m) {
        const float dx = in.dx[(row0 + m) * G + g];
        const float ox = dx * static_cast<float>(in.sx[(row0 + m) * G + g]);
        acc[m][0] += to_float(sum[m][0]) * (d0 * dx) + o0 * ox;
        acc[m][1] += to_float(sum[m][1]) * (d1 * dx) + o1 * ox;
      }
    } else {
      for (int m = 0; m < M; ++m) {
        const float dx = in.dx[(row0 + m) * G + g];
        const int32_t shift = 128 * in.sx[(row0 + m) * G + g];
        acc[m][0] += to_float(sum[m][0] - shift) * (d0 * dx);
        acc[m][1] += to_float(sum[m][1] - shift) * (d1 * dx);
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
using PanelFn = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, const float*,
                         const float*, float*, int64_t, int64_t, int64_t);

template <bool kFour>
PanelFn<kFour> panel_fn(int rows) {
  switch (rows) {
    case 1: return panel_product<1, kFour>;
    case 2: return panel_product<2, kFour>;
    case 3: return panel_product<3, kFour>;
    case 4: return panel_product<4, kFour>;
    case 5: return panel_product<5, kFour>;
    case 6: return panel_product<6, kFour>;
    case 7: return panel_product<7, kFour>;
    default: return panel_product<8, kFour>;
  }
}

// One call's work, shared with helper threads (kept alive by whoever still holds it).
template <bool kFour>
struct Work {
  QuantizedRows in;
  const uint8_t* packed;
  const float* scale;
  const float* offset;
  float* y;
  int64_t M, N, G, panels, chunk, panel_bytes;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Claims chunks of panels until none is left; each chunk's weights are reused from cache
  // by every group of up to 8 input rows.
  void run() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= items) return;
      const int64_t first = c * chunk, last = std::min(panels, first + chunk);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        const PanelFn<kFour> fn = panel_fn<kFour>(static_cast<int>(std::min<int64_t>(kMaxRows, M - r)));
        for (int64_t p = first; p < last; ++p) {
          const int64_t n0 = p * kPanel;
          fn(in, r, G, packed + p * panel_bytes, scale + p * G * kPanel,
             offset == nullptr ? nullptr : offset + p * G * kPanel, y, N, n0,
             std::min(kPanel, N - n0));
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <bool kFour>
ffi::Error run_product(ffi::ThreadPool& pool, const float* x, const uint8_t* packed,
                       const float* scale, const float* offset, float* y, int64_t M, int64_t K,
                       int64_t N) {
  auto work = std::make_shared<Work<kFour>>();
  work->G = (K + kBlock - 1) / kBlock;
  quantize_rows(x, M, K, work->G, &work->in);
  work->packed = packed;
  work->scale = scale;
  work->offset = offset;
  work->y = y;
  work->M = M;
  work->N = N;
  work->panels = (N + kPanel - 1) / kPanel;
  work->panel_bytes = work->G * kQuads * (kFour ? 64 : 128);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About 4 chunks per thread, each at least 64 KB of weights.
  const int64_t min_panels = std::max<int64_t>(1, (64 * 1024) / work->panel_bytes);
  work->chunk = std::max(min_panels, (work->panels + 4 * threads - 1) / (4 * threads));
  work->items = (work->panels + work->chunk - 1) / work->chunk;
  run_shared(pool, work);
  return ffi::Error::Success();
}

// x [M, K], packed [P, G, 8, quad bytes], scale (offset) [P, G, 32], y [M, N].
bool shapes_ok(const ffi::Span<const int64_t>& xd, const ffi::Span<const int64_t>& pd,
               const ffi::Span<const int64_t>& yd, int64_t quad_bytes, size_t scale_count) {
  if (xd.size() != 2 || pd.size() != 4 || yd.size() != 2 || yd[0] != xd[0]) return false;
  const int64_t groups = (xd[1] + kBlock - 1) / kBlock;
  const int64_t panels = (yd[1] + kPanel - 1) / kPanel;
  return pd[0] == panels && pd[1] == groups && pd[2] == kQuads && pd[3] == quad_bytes &&
         scale_count == static_cast<size_t>(panels * groups * kPanel);
}

ffi::Error q8_blocks_int8_dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scale,
                              ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!shapes_ok(xd, pd, yd, 128, scale.element_count())) {
    return ffi::Error::InvalidArgument(
        "q8_blocks_int8_dot: expected x [M, K], packed [ceil(N / 32), ceil(K / 32), 8, 128], "
        "scale [ceil(N / 32), ceil(K / 32), 32], y [M, N]");
  }
  return run_product<false>(pool, x.typed_data(), packed.typed_data(), scale.typed_data(),
                            nullptr, y->typed_data(), xd[0], xd[1], yd[1]);
}

ffi::Error q4_blocks_int8_dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (!shapes_ok(xd, pd, yd, 64, scale.element_count()) ||
      offset.element_count() != scale.element_count()) {
    return ffi::Error::InvalidArgument(
        "q4_blocks_int8_dot: expected x [M, K], packed [ceil(N / 32), ceil(K / 32), 8, 64], "
        "scale and offset [ceil(N / 32), ceil(K / 32), 32], y [M, N]");
  }
  return run_product<true>(pool, x.typed_data(), packed.typed_data(), scale.typed_data(),
                           offset.typed_data(), y->typed_data(), xd[0], xd[1], yd[1]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaQ8BlocksInt8Dot, q8_blocks_int8_dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaQ4BlocksInt8Dot, q4_blocks_int8_dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
