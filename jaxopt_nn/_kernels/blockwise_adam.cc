// Fused one-pass block-wise quantized Adam / RMSprop step for XLA on CPU.
//
// Per block of `block_size` elements along the last axis of each row, one
// pass over the gradient decodes the old moment codes, updates the moments,
// takes the block maxima, encodes the new moments and writes the update, so
// each moment is decoded once (XLA's CPU loop fusions have one output each
// and decode every moment about three times). Each thread takes a contiguous
// range of blocks.
//
// Numerics mirror jaxopt_nn/_blockwise.py and the update in jaxopt_nn/optim.py
// operation for operation (same code layouts, round-to-nearest through the
// float32 bit pattern, scale rule, float32 arithmetic in the same order), so
// the codes and scales equal the XLA path's. Compile with -ffp-contract=off
// so the compiler fuses no multiply-add on its own: the kernel fuses one
// (MulAdd, below) exactly where XLA's LLVM contracts one on a CPU with FMA.
// -fno-math-errno lets sqrtf vectorise and changes no result. XLA turns a division by a
// constant into a multiplication by its float32 reciprocal, which the scales
// do here too. The bias corrections are applied as multiplications by their
// reciprocals (as XLA in jax 0.10 does; XLA in jax 0.12 divides), and
// RMSprop's 1 / sqrt is exact (XLA's rsqrt may differ in the last bit):
// the update may differ from the XLA path's in the last bit, the state not.
//
// Code layouts (exponent bits, mantissa bits) of the magnitude:
//   8 bits: signed (4, 3) + sign bit, sqrt (4, 4);
//   4 bits: signed (2, 1) + sign bit, sqrt (3, 1); two codes per byte, the
//   first element in the low half-byte.
//
// Targets (XLA FFI, api version 4):
//   jaxopt_nn_blockwise_adam(g, m_codes, m_scales, v_codes, v_scales, hyper)
//     -> (update, m_codes, m_scales, v_codes, v_scales)
//     hyper[..., 9] = (b1, 1 - b1, b2, 1 - b2, 1 - b1**t, 1 - b2**t,
//                      1 - b1**(t + 1), eps, eps_root)
//   jaxopt_nn_blockwise_rms(g, v_codes, v_scales, hyper)
//     -> (update, v_codes, v_scales)
//     hyper[..., 4] = (decay, 1 - decay, bias correction (1 if none), eps)
//   attributes: bits (4 or 8), block_size, mode (0 Adam, 1 NAdam,
//   2 RMSprop with eps inside the root, 3 eps outside).
// g is float32 (rows..., n); codes uint8 (rows..., n or ceil(n / 2));
// scales float32 (rows..., ceil(n / block_size)). Leading axes of `hyper`
// are batch axes (jax.vmap): the rows split evenly among them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"


namespace ffi = xla::ffi;

// The element loops read and write distinct buffers (the gradient, the
// update and per-thread scratch); said so, the compilers vectorise them
// without run-time overlap checks.
#if defined(__clang__)
#define JAXOPT_NN_VECTOR_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define JAXOPT_NN_VECTOR_LOOP _Pragma("GCC ivdep")
#else
#define JAXOPT_NN_VECTOR_LOOP
#endif

namespace {

enum Mode : int { kAdam = 0, kNadam = 1, kRmsEpsInSqrt = 2, kRmsEpsOutside = 3 };

inline uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float Float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// A small float code: magnitude with E exponent and M mantissa bits.
template <int E, int M>
struct Magnitude {
  static constexpr int32_t kOffset = (127 - ((1 << E) - 1)) << M;
  static constexpr int kShift = 23 - M;
  static constexpr float kLargest = 2.0f - 1.0f / float(1 << M);

  // Nearest code of a >= 0 (unclipped): half a unit of the kept mantissa is
  // added to the bit pattern, a carry moves into the exponent.
  static inline int32_t Code(float a) {
    uint32_t rounded = Bits(a) + (1u << (kShift - 1));
    return (int32_t(rounded) >> kShift) - kOffset;
  }
  static inline float Value(int32_t c) { return Float(uint32_t(c + kOffset) << kShift); }
};

template <int BITS>
struct Layout {
  using Signed = Magnitude<BITS == 8 ? 4 : 2, BITS == 8 ? 3 : 1>;
  using Sqrt = Magnitude<BITS == 8 ? 4 : 3, BITS == 8 ? 4 : 1>;
  static constexpr int32_t kSignedTop = (1 << (BITS - 1)) - 1;
  static constexpr int32_t kSqrtTop = (1 << BITS) - 1;
};

// One moment's stored codes and scales and where their new values go.
struct Moment {
  const uint8_t* codes;
  const float* scales;
  uint8_t* codes_out;
  float* scales_out;
};

struct Problem {
  const float* g;
  float* update;
  Moment m;  // unset for RMSprop
  Moment v;
  const float* hyper;
  int64_t hyper_size;      // hyperparameters per batch entry
  int64_t rows_per_batch;  // rows sharing one set of hyperparameters
  int64_t n;               // elements per row
  int64_t code_cols;       // bytes of codes per row
  int64_t blocks;          // blocks per row
  int64_t block_size;
};

// a * b + c as XLA on CPU computes `a * b + c * d` and `a * b + c`: XLA lets
// LLVM contract a multiply feeding an add into a fused multiply-add where the
// CPU has one (the first operand's multiply when both are), so the kernel
// does the same, explicitly, at exactly those places.
inline float MulAdd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Codes of one block copied into `buffer`, one per byte (4 bits: unpacked).
template <int BITS>
inline const uint8_t* Unpack(const uint8_t* packed, int64_t len, uint8_t* buffer) {
  if (BITS == 8) {
    std::memcpy(buffer, packed, len);
    return buffer;
  }
  for (int64_t j = 0; j < (len + 1) / 2; ++j) {
    buffer[2 * j] = packed[j] & 15;
    buffer[2 * j + 1] = packed[j] >> 4;
  }
  return buffer;
}

template <int BITS>
inline void Pack(const uint8_t* codes, int64_t len, uint8_t* out) {
  if (BITS == 8) {
    std::memcpy(out, codes, len);
    return;
  }
  for (int64_t j = 0; j < (len + 1) / 2; ++j) out[j] = codes[2 * j] | (codes[2 * j + 1] << 4);
}

// One moment's old value from its code and block scale.
template <int BITS>
inline float DecodeSigned(int32_t c, float scale) {
  using L = Layout<BITS>;
  const int32_t magnitude = c & L::kSignedTop;
  const float value = magnitude == 0 ? 0.0f : L::Signed::Value(magnitude);
  return (c > L::kSignedTop ? -value : value) * scale;
}

template <int BITS>
inline float DecodeSqrt(int32_t c, float scale) {
  const float root = Layout<BITS>::Sqrt::Value(c) * scale;
  return root * root;
}

// The new moments: (1 - decay) * g + decay * old, (1 - decay) * g * g + decay * old.
template <int BITS>
inline float NewSigned(float g, int32_t c, float scale, float decay, float c_decay) {
  return MulAdd(c_decay, g, decay * DecodeSigned<BITS>(c, scale));
}

template <int BITS>
inline float NewSqrt(float g, int32_t c, float scale, float decay, float c_decay) {
  return MulAdd(c_decay, g * g, decay * DecodeSqrt<BITS>(c, scale));
}

template <int BITS>
inline uint8_t EncodeSigned(float x, float inverse) {
  using L = Layout<BITS>;
  const int32_t c = std::min(std::max(L::Signed::Code(std::fabs(x) * inverse), 0), L::kSignedTop);
  return uint8_t(x < 0 ? c | (L::kSignedTop + 1) : c);
}

template <int BITS>
inline uint8_t EncodeSqrt(float x, float inverse) {
  using L = Layout<BITS>;
  return uint8_t(std::min(std::max(L::Sqrt::Code(std::sqrt(x) * inverse), 0), L::kSqrtTop));
}

// The hyperparameters of one block's rows, with the bias corrections as
// reciprocals.
template <int MODE>
struct Hyper {
  static constexpr bool kAdamLike = MODE == kAdam || MODE == kNadam;
  float b1, c_b1, b2, c_b2, r1, r1_next, r2, eps, eps_root;

  explicit Hyper(const float* h) {
    // Adam: (b1, 1 - b1, b2, 1 - b2, c1, c2, c1_next, eps, eps_root);
    // RMSprop: (decay, 1 - decay, correction, eps).
    b1 = h[0];
    c_b1 = h[1];
    b2 = kAdamLike ? h[2] : h[0];
    c_b2 = kAdamLike ? h[3] : h[1];
    r1 = kAdamLike ? 1.0f / h[4] : 1.0f;
    r2 = 1.0f / (kAdamLike ? h[5] : h[2]);
    r1_next = kAdamLike ? 1.0f / h[6] : 1.0f;
    eps = kAdamLike ? h[7] : h[3];
    eps_root = kAdamLike ? h[8] : 0.0f;
  }

  // The update from the new (unrounded) moments and the gradient.
  inline float Update(float m, float v, float g) const {
    if (kAdamLike) {
      const float m_hat = MODE == kNadam ? MulAdd(b1, m * r1_next, c_b1 * (g * r1)) : m * r1;
      return m_hat / (std::sqrt(MulAdd(v, r2, eps_root)) + eps);
    }
    const float scaling = MODE == kRmsEpsInSqrt ? 1.0f / std::sqrt(MulAdd(v, r2, eps))
                                                : 1.0f / (std::sqrt(v * r2) + eps);
    return scaling * g;
  }
};

template <int BITS, int MODE>
void Run(const Problem& p, int64_t first, int64_t last) {
  using L = Layout<BITS>;
  using S = typename L::Signed;
  using Q = typename L::Sqrt;
  constexpr bool kAdamLike = Hyper<MODE>::kAdamLike;
  const int64_t bs = p.block_size;
  std::vector<float> m_buffer(bs), v_buffer(bs);
  std::vector<uint8_t> codes(4 * (bs + 2));
  uint8_t* __restrict mc = codes.data();
  uint8_t* __restrict vc = mc + bs + 2;
  uint8_t* __restrict mc_new = vc + bs + 2;
  uint8_t* __restrict vc_new = mc_new + bs + 2;
  float* __restrict m = m_buffer.data();
  float* __restrict v = v_buffer.data();

  for (int64_t unit = first; unit < last; ++unit) {
    const int64_t row = unit / p.blocks, block = unit % p.blocks;
    const int64_t start = block * bs, len = std::min(bs, p.n - start);
    const int64_t code_start = row * p.code_cols + (BITS == 8 ? start : start / 2);
    const int64_t scale_at = row * p.blocks + block;
    const Hyper<MODE> h(p.hyper + (row / p.rows_per_batch) * p.hyper_size);
    const float* g = p.g + row * p.n + start;
    float* u = p.update + row * p.n + start;  // may be g itself: read first
    // The codes are copied (4 bits: unpacked) first: with the state donated,
    // the new codes overwrite them in place.
    const uint8_t* __restrict vcodes = Unpack<BITS>(p.v.codes + code_start, len, vc);
    const uint8_t* __restrict mcodes =
        kAdamLike ? Unpack<BITS>(p.m.codes + code_start, len, mc) : nullptr;
    const float v_scale = p.v.scales[scale_at];
    const float m_scale = kAdamLike ? p.m.scales[scale_at] : 0.0f;
    float m_absmax = 0.0f, v_absmax;

    if (BITS == 8) {
      // Scales from a bound: decay * stored maximum + (1 - decay) * the
      // gradient's maximum (of squares, under the root, for v). Maxima are
      // taken on the bit patterns of non-negative floats (same order).
      uint32_t g_peak = 0;
      JAXOPT_NN_VECTOR_LOOP
      for (int64_t i = 0; i < len; ++i) g_peak = std::max(g_peak, Bits(std::fabs(g[i])));
      const float g_max = Float(g_peak);
      const float v_peak = v_scale * Q::kLargest;
      v_absmax = std::sqrt(MulAdd(h.b2 * v_peak, v_peak, h.c_b2 * g_max * g_max));
      if (kAdamLike) m_absmax = MulAdd(h.b1, m_scale * S::kLargest, h.c_b1 * g_max);
    } else {
      // Scales from the exact maxima of the new moments, kept in `m` and `v`.
      uint32_t m_peak = 0, v_peak = 0;
      JAXOPT_NN_VECTOR_LOOP
      for (int64_t i = 0; i < len; ++i) {
        v[i] = NewSqrt<BITS>(g[i], vcodes[i], v_scale, h.b2, h.c_b2);
        v_peak = std::max(v_peak, Bits(v[i]));
      }
      if (kAdamLike) {
        JAXOPT_NN_VECTOR_LOOP
        for (int64_t i = 0; i < len; ++i) {
          m[i] = NewSigned<BITS>(g[i], mcodes[i], m_scale, h.b1, h.c_b1);
          m_peak = std::max(m_peak, Bits(std::fabs(m[i])));
        }
      }
      v_absmax = std::sqrt(Float(v_peak));
      m_absmax = Float(m_peak);
    }
    // XLA turns `absmax / largest` into a multiplication by the reciprocal.
    p.v.scales_out[scale_at] = v_absmax * (1.0f / Q::kLargest);
    const float v_inverse = v_absmax > 0 ? Q::kLargest / v_absmax : 0.0f;
    float m_inverse = 0.0f;
    if (kAdamLike) {
      p.m.scales_out[scale_at] = m_absmax * (1.0f / S::kLargest);
      m_inverse = m_absmax > 0 ? S::kLargest / m_absmax : 0.0f;
    }

    // Encode the new moments and write the update from the unrounded ones
    // (8 bits: the moments are computed here, in the same loop).
    if (kAdamLike) {
      JAXOPT_NN_VECTOR_LOOP
      for (int64_t i = 0; i < len; ++i) {
        const float mi = BITS == 8 ? NewSigned<BITS>(g[i], mcodes[i], m_scale, h.b1, h.c_b1) : m[i];
        const float vi = BITS == 8 ? NewSqrt<BITS>(g[i], vcodes[i], v_scale, h.b2, h.c_b2) : v[i];
        mc_new[i] = EncodeSigned<BITS>(mi, m_inverse);
        vc_new[i] = EncodeSqrt<BITS>(vi, v_inverse);
        u[i] = h.Update(mi, vi, g[i]);
      }
    } else {
      JAXOPT_NN_VECTOR_LOOP
      for (int64_t i = 0; i < len; ++i) {
        const float vi = BITS == 8 ? NewSqrt<BITS>(g[i], vcodes[i], v_scale, h.b2, h.c_b2) : v[i];
        vc_new[i] = EncodeSqrt<BITS>(vi, v_inverse);
        u[i] = h.Update(0.0f, vi, g[i]);
      }
    }
    if (len % 2) {
      mc_new[len] = 0;
      vc_new[len] = 0;
    }
    Pack<BITS>(vc_new, len, p.v.codes_out + code_start);
    if (kAdamLike) Pack<BITS>(mc_new, len, p.m.codes_out + code_start);
  }
}

// Blocks split into contiguous ranges, one per thread; small tensors run on
// the calling thread only.
template <int BITS, int MODE>
void Launch(const Problem& p, int64_t rows) {
  const int64_t units = rows * p.blocks;
  const int64_t elements = rows * p.n;
  constexpr int64_t kPerThread = 1 << 16;  // below this a thread costs more than it saves
  int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min({threads, units, std::max<int64_t>(1, elements / kPerThread)});
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back(Run<BITS, MODE>, std::cref(p), units * t / threads,
                      units * (t + 1) / threads);
  Run<BITS, MODE>(p, 0, units / threads);
  for (auto& thread : pool) thread.join();
}

template <int BITS>
void LaunchMode(const Problem& p, int64_t rows, int64_t mode) {
  switch (mode) {
    case kAdam: return Launch<BITS, kAdam>(p, rows);
    case kNadam: return Launch<BITS, kNadam>(p, rows);
    case kRmsEpsInSqrt: return Launch<BITS, kRmsEpsInSqrt>(p, rows);
    default: return Launch<BITS, kRmsEpsOutside>(p, rows);
  }
}

int64_t LastAxis(ffi::AnyBuffer::Dimensions dims) { return dims.size() ? dims.back() : 1; }

// Fills the shapes of `p` from the gradient and checks the hyperparameters.
ffi::Error Shape(Problem& p, int64_t& rows, ffi::AnyBuffer::Dimensions g_dims, size_t g_size,
                 size_t hyper_size, int64_t per_batch, int64_t bits, int64_t block_size,
                 int64_t mode, bool adam) {
  if (bits != 8 && bits != 4) return ffi::Error::InvalidArgument("bits must be 4 or 8");
  if (block_size < 1 || (bits == 4 && block_size % 2))
    return ffi::Error::InvalidArgument("block_size must be >= 1 (even with 4 bits)");
  if (adam != (mode == kAdam || mode == kNadam))
    return ffi::Error::InvalidArgument("mode does not match the target");
  p.n = LastAxis(g_dims);
  rows = p.n ? int64_t(g_size) / p.n : 0;
  p.code_cols = bits == 8 ? p.n : (p.n + 1) / 2;
  p.blocks = (p.n + block_size - 1) / block_size;
  p.block_size = block_size;
  p.hyper_size = per_batch;
  const int64_t batches = int64_t(hyper_size) / per_batch;
  if (int64_t(hyper_size) % per_batch || batches < 1 || rows % batches)
    return ffi::Error::InvalidArgument("hyperparameters do not match the rows");
  p.rows_per_batch = std::max<int64_t>(1, rows / batches);
  return ffi::Error::Success();
}

// Points `moment` at its buffers after checking that they have the gradient's
// rows (every row is read and written, so a smaller buffer must not reach the
// loops).
ffi::Error BindMoment(const Problem& p, int64_t rows, ffi::Buffer<ffi::U8>& codes,
                      ffi::Buffer<ffi::F32>& scales, ffi::ResultBuffer<ffi::U8>& codes_out,
                      ffi::ResultBuffer<ffi::F32>& scales_out, Moment& moment) {
  if (LastAxis(codes.dimensions()) != p.code_cols || LastAxis(scales.dimensions()) != p.blocks ||
      int64_t(codes.element_count()) != rows * p.code_cols ||
      int64_t(scales.element_count()) != rows * p.blocks)
    return ffi::Error::InvalidArgument("codes or scales do not match the gradient's shape");
  moment = {codes.typed_data(), scales.typed_data(), codes_out->typed_data(),
            scales_out->typed_data()};
  return ffi::Error::Success();
}

ffi::Error Dispatch(const Problem& p, int64_t rows, int64_t bits, int64_t mode) {
  if (rows == 0 || p.n == 0) return ffi::Error::Success();
  if (bits == 8)
    LaunchMode<8>(p, rows, mode);
  else
    LaunchMode<4>(p, rows, mode);
  return ffi::Error::Success();
}

ffi::Error AdamImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> m_codes,
                    ffi::Buffer<ffi::F32> m_scales, ffi::Buffer<ffi::U8> v_codes,
                    ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::F32> hyper,
                    ffi::ResultBuffer<ffi::F32> update, ffi::ResultBuffer<ffi::U8> m_codes_out,
                    ffi::ResultBuffer<ffi::F32> m_scales_out,
                    ffi::ResultBuffer<ffi::U8> v_codes_out,
                    ffi::ResultBuffer<ffi::F32> v_scales_out, int64_t bits, int64_t block_size,
                    int64_t mode) {
  Problem p{};
  int64_t rows = 0;
  ffi::Error error = Shape(p, rows, g.dimensions(), g.element_count(), hyper.element_count(), 9,
                           bits, block_size, mode, true);
  if (error.success())
    error = BindMoment(p, rows, m_codes, m_scales, m_codes_out, m_scales_out, p.m);
  if (error.success())
    error = BindMoment(p, rows, v_codes, v_scales, v_codes_out, v_scales_out, p.v);
  if (!error.success()) return error;
  p.g = g.typed_data();
  p.update = update->typed_data();
  p.hyper = hyper.typed_data();
  return Dispatch(p, rows, bits, mode);
}

ffi::Error RmsImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> v_codes,
                   ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::F32> hyper,
                   ffi::ResultBuffer<ffi::F32> update, ffi::ResultBuffer<ffi::U8> v_codes_out,
                   ffi::ResultBuffer<ffi::F32> v_scales_out, int64_t bits, int64_t block_size,
                   int64_t mode) {
  Problem p{};
  int64_t rows = 0;
  ffi::Error error = Shape(p, rows, g.dimensions(), g.element_count(), hyper.element_count(), 4,
                           bits, block_size, mode, false);
  if (error.success())
    error = BindMoment(p, rows, v_codes, v_scales, v_codes_out, v_scales_out, p.v);
  if (!error.success()) return error;
  p.g = g.typed_data();
  p.update = update->typed_data();
  p.hyper = hyper.typed_data();
  return Dispatch(p, rows, bits, mode);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptNnBlockwiseAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptNnBlockwiseRms, RmsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("mode"));
