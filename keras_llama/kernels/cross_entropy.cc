// Softmax cross-entropy from logits on CPU, forward and backward, for training a language
// model: per row of logits [N, V] (float32) and an int label,
//
//   forward:  loss = logsumexp(logits) - logits[label],  and the row's logsumexp;
//   backward: dlogits = (exp(logits - logsumexp) - one_hot(label)) * grad[row].
//
// A label outside [0, V) contributes nothing, as in Keras (its one-hot row is all zeros):
// loss 0 and gradient 0.
//
// At a 49k vocabulary the logits are the largest tensor of a small model's training step
// ([1024, 49152] float32 = 200 MB at 4 x 256 tokens). XLA:CPU makes three passes over them
// with scalar exponentials (about 0.2 s of a SmolLM2-135M step); here the forward pass reads
// them twice and the backward pass once, with 16-wide exponentials, and the backward pass
// can write its gradient over the logits (the caller aliases them).
//
// Rows are shared with XLA's intra-op thread pool through an atomic counter, as in
// decode_matmul.cc. Built and loaded at first use by keras_llama/kernels/library.py.

#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr int64_t kRowsPerItem = 8;

// logsumexp of one row of V floats.
float row_logsumexp(const float* x, int64_t V) {
  const int64_t body = V / 16 * 16;
  float mx = -std::numeric_limits<float>::infinity();
  if (body) {
    f32x16 m = load(x);
    for (int64_t j = 16; j < body; j += 16) {
      const f32x16 v = load(x + j);
      m = v > m ? v : m;
    }
    mx = hmax(m);
  }
  for (int64_t j = body; j < V; ++j) mx = std::max(mx, x[j]);
  if (std::isinf(mx)) return mx;  // all -inf (or an inf): logsumexp is that value
  const f32x16 vm = splat(mx);
  f32x16 acc = f32x16{};
  for (int64_t j = 0; j < body; j += 16) acc += vexp(load(x + j) - vm);
  float sum = hsum(acc);
  for (int64_t j = body; j < V; ++j) sum += std::exp(x[j] - mx);
  return mx + std::log(sum);
}

struct Rows {
  int64_t N, V, items;
  std::atomic<int64_t> next{0}, done{0};
  virtual void rows(int64_t first, int64_t last) = 0;
  virtual ~Rows() = default;
  void run() {
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      const int64_t first = item * kRowsPerItem;
      rows(first, std::min(N, first + kRowsPerItem));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

struct Forward : Rows {
  const float* logits;
  const int32_t* labels;
  float *loss, *lse;
  void rows(int64_t first, int64_t last) override {
    for (int64_t r = first; r < last; ++r) {
      const float* x = logits + r * V;
      const int32_t label = labels[r];
      const float l = row_logsumexp(x, V);
      lse[r] = l;
      loss[r] = (label >= 0 && label < V) ? l - x[label] : 0.0f;
    }
  }
};

struct Backward : Rows {
  const float* logits;
  const int32_t* labels;
  const float *lse, *grad;
  float* dlogits;
  void rows(int64_t first, int64_t last) override {
    const int64_t body = V / 16 * 16;
    for (int64_t r = first; r < last; ++r) {
      const float* x = logits + r * V;
      float* d = dlogits + r * V;
      const int32_t label = labels[r];
      if (label < 0 || label >= V) {
        std::memset(d, 0, V * sizeof(float));
        continue;
      }
      const float g = grad[r];
      const f32x16 vl = splat(lse[r]), vg = splat(g);
      for (int64_t j = 0; j < body; j += 16) store(d + j, vexp(load(x + j) - vl) * vg);
      for (int64_t j = body; j < V; ++j) d[j] = std::exp(x[j] - lse[r]) * g;
      d[label] -= g;
    }
  }
};

bool rows_and_vocab(const ffi::Buffer<ffi::F32>& logits, int64_t* N, int64_t* V) {
  const auto d = logits.dimensions();
  if (d.size() != 2) return false;
  *N = d[0];
  *V = d[1];
  return true;
}

ffi::Error cross_entropy_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                                 ffi::Buffer<ffi::S32> labels, ffi::ResultBuffer<ffi::F32> loss,
                                 ffi::ResultBuffer<ffi::F32> lse) {
  int64_t N, V;
  if (!rows_and_vocab(logits, &N, &V) || static_cast<int64_t>(labels.element_count()) != N ||
      static_cast<int64_t>(loss->element_count()) != N ||
      static_cast<int64_t>(lse->element_count()) != N) {
    return ffi::Error::InvalidArgument(
        "cross_entropy_forward: expected logits [N, V], labels [N], loss and lse [N]");
  }
  if (N == 0) return ffi::Error::Success();
  auto work = std::make_shared<Forward>();
  work->N = N;
  work->V = V;
  work->items = (N + kRowsPerItem - 1) / kRowsPerItem;
  work->logits = logits.typed_data();
  work->labels = labels.typed_data();
  work->loss = loss->typed_data();
  work->lse = lse->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

ffi::Error cross_entropy_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                                  ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> lse,
                                  ffi::Buffer<ffi::F32> grad,
                                  ffi::ResultBuffer<ffi::F32> dlogits) {
  int64_t N, V;
  if (!rows_and_vocab(logits, &N, &V) || static_cast<int64_t>(labels.element_count()) != N ||
      static_cast<int64_t>(lse.element_count()) != N ||
      static_cast<int64_t>(grad.element_count()) != N ||
      dlogits->element_count() != logits.element_count()) {
    return ffi::Error::InvalidArgument(
        "cross_entropy_backward: expected logits [N, V], labels, lse and grad [N], "
        "dlogits [N, V]");
  }
  if (N == 0) return ffi::Error::Success();
  auto work = std::make_shared<Backward>();
  work->N = N;
  work->V = V;
  work->items = (N + kRowsPerItem - 1) / kRowsPerItem;
  work->logits = logits.typed_data();
  work->labels = labels.typed_data();
  work->lse = lse.typed_data();
  work->grad = grad.typed_data();
  work->dlogits = dlogits->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaCrossEntropyForward, cross_entropy_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaCrossEntropyBackward, cross_entropy_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
