// Matrix-vector products for CPU decoding: weight-only int8 / int4 (AVX-512 VNNI) and plain bf16 (AVX-512 BF16),
// threads over output rows.
// Why: decode reads every weight once per token, so its speed is weight bytes over memory bandwidth. PyTorch's
// stock weight-only kernels widen every weight to fp32 and stream at about half the bandwidth for one row of
// activations. Here the activations are quantized to int8 in blocks of 32 (one fp32 scale each, as llama.cpp's
// Q8_0), and VNNI's u8 x s8 dot product (vpdpbusd) takes 32 weights per instruction, so the loop is bound by
// memory, not arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kPrefetch = 8192;  // bytes ahead of the weight stream (int4 rows of 2048 inputs are 1 KB)

struct QuantizedRows {  // activations [m, in] as int8 blocks of 32 with one scale per block
  std::vector<int8_t> q;
  std::vector<float> scale;    // [m, blocks]
  std::vector<int32_t> qsum;   // [m, blocks]: sum of the block's int8 values
  std::vector<float> sum;      // [m, blocks]: sum of the block's original values
  std::vector<float> qsumf;    // qsum as float
};

QuantizedRows quantize_rows(const float* x, int64_t m, int64_t in, int64_t block = kBlock) {
  const int64_t blocks = in / block;
  QuantizedRows r{std::vector<int8_t>(m * in), std::vector<float>(m * blocks), std::vector<int32_t>(m * blocks),
                  std::vector<float>(m * blocks), std::vector<float>(m * blocks)};
  for (int64_t b = 0; b < m * blocks; ++b) {
    const float* v = x + b * block;
    float amax = 0.f, total = 0.f;
    for (int64_t i = 0; i < block; ++i) {
      amax = std::max(amax, std::fabs(v[i]));
      total += v[i];
    }
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t qs = 0;
    for (int64_t i = 0; i < block; ++i) {
      const int8_t q = static_cast<int8_t>(std::lrintf(v[i] * inv));
      r.q[b * block + i] = q;
      qs += q;
    }
    r.scale[b] = s;
    r.qsum[b] = qs;
    r.qsumf[b] = static_cast<float>(qs);
    r.sum[b] = total;
  }
  return r;
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int8: weights stored as u8 = q + 128; dot(q + 128, xq) = dot(q, xq) + 128 * sum(xq). The correction does not
// depend on the row, so it is computed once per activation row (`correction`). `lanes` holds each block's scale
// spread over the 8 int32 lanes its 32 bytes produce, so a 64-byte step needs one multiply-add.
void int8_rows(const QuantizedRows& x, const std::vector<float>& lanes, const std::vector<float>& correction,
               int64_t m, int64_t in, const uint8_t* w, const float* scale, float* y, int64_t out, int64_t begin,
               int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = w + o * in;
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* xq = x.q.data() + r * in;
      const float* lr = lanes.data() + r * (in / 4);
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 128 <= in; i += 128) {
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + i), _mm512_loadu_si512(xq + i));
        __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + i + 64),
                                         _mm512_loadu_si512(xq + i + 64));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(lr + i / 4), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_loadu_ps(lr + i / 4 + 16), acc1);
      }
      for (; i + 64 <= in; i += 64) {
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + i), _mm512_loadu_si512(xq + i));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(lr + i / 4), acc0);
      }
      float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      for (; i < in; i += kBlock) {  // a last lone block of 32
        __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i)));
        total += hsum8(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(lr + i / 4)));
      }
      y[r * out + o] = (total - 128.f * correction[r]) * scale[o];
    }
  }
}

// int4 in groups of 128 (64 bytes: low nibbles = weights 0..63 of the group, high nibbles = 64..127), activations
// in int8 blocks of 128 too, so a group's two dot products accumulate in int32 and take one scale: 8 vector
// operations per 64 bytes of weights. Same centring as above: w = (q - 8) * scale + (low + 8 * scale).
void int4_rows(const QuantizedRows& x, int64_t m, int64_t in, const uint8_t* w, const at::Half* scale,
                   const at::Half* low, float* y, int64_t out, int64_t begin, int64_t end) {
  constexpr int64_t G = 128;
  const int64_t groups = in / G;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = w + o * (in / 2);
    const at::Half* s_row = scale + o * groups;
    const at::Half* l_row = low + o * groups;
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* xq = x.q.data() + r * in;
      const float* xs = x.scale.data() + r * groups;
      const float* xsum = x.sum.data() + r * groups;
      const float* xqsum = x.qsumf.data() + r * groups;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      float low_term = 0.f;
      int64_t g = 0;
      for (; g + 2 <= groups; g += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + g * 64 + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + g * 64 + kPrefetch + 64), _MM_HINT_T0);
        __m512i b0 = _mm512_loadu_si512(row + g * 64);
        __m512i b1 = _mm512_loadu_si512(row + (g + 1) * 64);
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b0, mask), _mm512_loadu_si512(xq + g * G));
        __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b1, mask), _mm512_loadu_si512(xq + (g + 1) * G));
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(_mm512_srli_epi16(b0, 4), mask), _mm512_loadu_si512(xq + g * G + 64));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(b1, 4), mask), _mm512_loadu_si512(xq + (g + 1) * G + 64));
        const float s0 = static_cast<float>(s_row[g]), s1 = static_cast<float>(s_row[g + 1]);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s0 * xs[g]), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(s1 * xs[g + 1]), acc1);
        low_term += (static_cast<float>(l_row[g]) + 8.f * s0) * xsum[g] - 8.f * s0 * xs[g] * xqsum[g]
                  + (static_cast<float>(l_row[g + 1]) + 8.f * s1) * xsum[g + 1] - 8.f * s1 * xs[g + 1] * xqsum[g + 1];
      }
      for (; g < groups; ++g) {
        __m512i b0 = _mm512_loadu_si512(row + g * 64);
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b0, mask), _mm512_loadu_si512(xq + g * G));
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(_mm512_srli_epi16(b0, 4), mask), _mm512_loadu_si512(xq + g * G + 64));
        const float s0 = static_cast<float>(s_row[g]);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s0 * xs[g]), acc0);
        low_term += (static_cast<float>(l_row[g]) + 8.f * s0) * xsum[g] - 8.f * s0 * xs[g] * xqsum[g];
      }
      y[r * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + low_term;
    }
  }
}

// bf16 x bf16 with fp32 accumulation (AVX-512 BF16 `vdpbf16ps`: 32 products per instruction), for the decode
// rows of an unquantized bf16 model: PyTorch's bf16 linear streams one activation row's weights well below the
// memory bandwidth; four independent accumulators and a software prefetch keep this loop on the memory limit.
__attribute__((target("avx512f,avx512bf16"))) void bf16_rows(const at::BFloat16* x, int64_t m, int64_t in, const at::BFloat16* w, float* y, int64_t out,
               int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const at::BFloat16* row = w + o * in;
    for (int64_t r = 0; r < m; ++r) {
      const at::BFloat16* xr = x + r * in;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
             acc3 = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 128 <= in; i += 128) {
        if (r == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetch, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetch + 64, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetch + 128, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetch + 192, _MM_HINT_T0);
        }
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + i), (__m512bh)_mm512_loadu_si512(xr + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(row + i + 32), (__m512bh)_mm512_loadu_si512(xr + i + 32));
        acc2 = _mm512_dpbf16_ps(acc2, (__m512bh)_mm512_loadu_si512(row + i + 64), (__m512bh)_mm512_loadu_si512(xr + i + 64));
        acc3 = _mm512_dpbf16_ps(acc3, (__m512bh)_mm512_loadu_si512(row + i + 96), (__m512bh)_mm512_loadu_si512(xr + i + 96));
      }
      for (; i + 32 <= in; i += 32) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + i), (__m512bh)_mm512_loadu_si512(xr + i));
      }
      float total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
      for (; i < in; ++i) total += static_cast<float>(row[i]) * static_cast<float>(xr[i]);
      y[r * out + o] = total;
    }
  }
}

// LFM2's short convolution for one decode token, fused: from the in_proj output [B | C | x] (3 x hidden), push
// B * x into the layer's conv state (hidden x K, updated in place) and return C * sum_k state[k] * weight[k].
// transformers' fallback runs ~8 tensor ops for this (a cat, a copy, a grouped conv1d, chunks, products), most
// of which is per-op overhead at one token; here it is one pass over 3 x hidden values.
template <typename scalar_t>
void short_conv_rows(const scalar_t* bcx, scalar_t* state, const scalar_t* weight, scalar_t* y, int64_t batch,
                     int64_t hidden, int64_t k, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const scalar_t* w = weight + c * k;
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t* row = bcx + b * 3 * hidden;
      scalar_t* st = state + (b * hidden + c) * k;
      for (int64_t j = 0; j + 1 < k; ++j) st[j] = st[j + 1];
      st[k - 1] = static_cast<scalar_t>(static_cast<float>(row[c]) * static_cast<float>(row[2 * hidden + c]));
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += static_cast<float>(st[j]) * static_cast<float>(w[j]);
      const float conv = static_cast<float>(static_cast<scalar_t>(acc));  // rounded as transformers' conv1d output
      y[b * hidden + c] = static_cast<scalar_t>(static_cast<float>(row[hidden + c]) * conv);
    }
  }
}

int64_t grain(int64_t out) { return std::max<int64_t>(16, out / (4 * at::get_num_threads())); }

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous() && w.dim() == 2, "w: contiguous uint8 [out, in] (q + 128)");
  const int64_t out = w.size(0), in = w.size(1);
  TORCH_CHECK(in % kBlock == 0, "in_features must be a multiple of 32");
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t m = xf.numel() / in;
  auto xq = quantize_rows(xf.data_ptr<float>(), m, in);
  std::vector<float> lanes(m * in / 4), correction(m, 0.f);
  for (int64_t b = 0; b < m * (in / kBlock); ++b) {
    for (int64_t j = 0; j < 8; ++j) lanes[b * 8 + j] = xq.scale[b];
    correction[b / (in / kBlock)] += xq.scale[b] * static_cast<float>(xq.qsum[b]);
  }
  auto sc = scale.to(torch::kFloat).contiguous();
  auto y = torch::empty({m, out}, xf.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, grain(out), [&](int64_t b, int64_t e) {
    int8_rows(xq, lanes, correction, m, in, wp, sp, yp, out, b, e);
  });
  return y;
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor low) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous(), "w: contiguous uint8 [out, in / 2]");
  TORCH_CHECK(scale.dtype() == torch::kHalf && low.dtype() == torch::kHalf, "scale/low: fp16 [out, in / 128]");
  const int64_t out = w.size(0), in = w.size(1) * 2;
  TORCH_CHECK(in % 128 == 0, "in_features must be a multiple of 128");
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t m = xf.numel() / in;
  auto xq = quantize_rows(xf.data_ptr<float>(), m, in, 128);
  auto sc = scale.contiguous();
  auto lo = low.contiguous();
  auto y = torch::empty({m, out}, xf.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = sc.data_ptr<at::Half>();
  const at::Half* lp = lo.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, grain(out), [&](int64_t b, int64_t e) { int4_rows(xq, m, in, wp, sp, lp, yp, out, b, e); });
  return y;
}

torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 2, "w: contiguous bf16 [out, in]");
  const int64_t out = w.size(0), in = w.size(1);
  auto xb = x.to(torch::kBFloat16).contiguous();
  const int64_t m = xb.numel() / in;
  auto y = torch::empty({m, out}, xb.options().dtype(torch::kFloat));
  const at::BFloat16* xp = xb.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, grain(out), [&](int64_t b, int64_t e) { bf16_rows(xp, m, in, wp, yp, out, b, e); });
  return y;
}

torch::Tensor short_conv_decode(torch::Tensor bcx, torch::Tensor state, torch::Tensor weight) {
  TORCH_CHECK(state.is_contiguous() && state.dim() == 3, "state: contiguous [batch, hidden, K]");
  const int64_t batch = state.size(0), hidden = state.size(1), k = state.size(2);
  TORCH_CHECK(bcx.numel() == batch * 3 * hidden, "bcx: the in_proj output of one token, [batch, 1, 3 * hidden]");
  TORCH_CHECK(bcx.dtype() == state.dtype(), "bcx and state must share a dtype");
  auto in = bcx.contiguous();
  auto w = weight.reshape({hidden, k}).to(state.dtype()).contiguous();
  auto y = torch::empty({batch, 1, hidden}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, state.scalar_type(), "short_conv_decode", [&] {
    const scalar_t* ip = in.data_ptr<scalar_t>();
    scalar_t* sp = state.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    short_conv_rows<scalar_t>(ip, sp, wp, yp, batch, hidden, k, 0, hidden);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, "y = x @ (q * scale + low).T, int4 groups of 128; x in int8 blocks of 128");
  m.def("short_conv_decode", &short_conv_decode, "LFM2 short conv for one token: state updated in place, returns C * conv");
  m.def("bf16_gemv", &bf16_gemv, "y = x @ w.T (fp32), bf16 weights and activations; needs AVX-512 BF16");
  m.def("int8_gemv", &int8_gemv, "y = x @ ((w - 128) * scale).T; x quantized to int8 blocks of 32");
}
