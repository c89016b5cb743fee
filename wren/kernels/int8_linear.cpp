// int8 x int8 products for Int8Linear on the CPU: wren_cpu::int8_linear(x, weight, scale).
//
// x (m, k) float32 is quantised row by row to int8 (symmetric, round half to even, scale
// max|x| / 127), multiplied by the int8 weight (n, k) in int32, and scaled back by the row's and
// the output's scale. The result is bit for bit what wren.model.quant.int8_activation_products
// computes with oneDNN, in the same order of float operations; this kernel is for the products of
// a few rows (decoding), where oneDNN's fixed cost per call dominates.
//
// The threads split the weight rows; each reads its rows in order, prefetching ahead, and takes
// each row once for up to four activation rows (for one, two sums over alternate blocks keep two
// in flight). `int8_linears` does this for several weights sharing x in one parallel loop. The
// sums use the CPU's int8 instructions:
// - AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so the activations are shifted
//   into 0..255 (x + 128) and 128 * sum(w) is taken off again, summed alongside;
// - AVX2: vpmaddubsw, with llama.cpp's sign trick: |x| times w carrying x's sign. This relies on
//   weights in -127..127, which Wren's symmetric quantiser guarantees.
// Built by wren.kernels with -march=native for the machine that runs it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define WREN_VNNI 1
#elif defined(__AVX2__)
#define WREN_AVX2 1
#else
#error "Wren's int8 kernel needs AVX-512 VNNI or AVX2"
#endif
#include <immintrin.h>

namespace {

// Prefetch this far ahead in a weight row (and on into the next rows, which follow in memory): a
// decode step reads each weight once, from memory or the last-level cache, and each product is
// too short for the hardware prefetchers to get ahead of it (benchmarks/RESULTS.md, one-off).
constexpr int64_t kPrefetch = 2048;

inline void prefetch(const int8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

#ifdef WREN_VNNI
using Activation = uint8_t;  // x + 128: vpdpbusd wants its first operand unsigned
constexpr int32_t kOffset = 128;
#else
using Activation = int8_t;
constexpr int32_t kOffset = 0;
#endif

inline int32_t scalar_dot(const Activation* a, const int8_t* w, int64_t from, int64_t k) {
  // Two plain sums: GCC 12 at -O3 vectorised sum((a - 128) * w) into wrong results.
  int32_t sum = 0, weights = 0;
  for (int64_t i = from; i < k; ++i) {
    sum += int32_t(a[i]) * int32_t(w[i]);
    weights += w[i];
  }
  return sum - kOffset * weights;
}

// out[r] = sum over i < k of x[r][i] * w[i] for the R activation rows from a (k apart): one weight
// row read once for R rows. With one row, two sums over alternate blocks keep two in flight.
template <int R>
inline void dots(const Activation* a, const int8_t* w, int64_t k, int32_t* out) {
  constexpr int J = R == 1 ? 2 : 1;  // blocks per iteration
  int64_t i = 0;
#ifdef WREN_VNNI
  constexpr int64_t step = 64;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s[R][J], t[J];
  for (int j = 0; j < J; ++j) {
    t[j] = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) s[r][j] = t[j];
  }
  for (; i + J * step <= k; i += J * step) {
    for (int j = 0; j < J; ++j) {
      prefetch(w + i + j * step + kPrefetch);
      const __m512i wj = _mm512_loadu_si512(w + i + j * step);
      t[j] = _mm512_dpbusd_epi32(t[j], ones, wj);  // sum(w): 128 * sum(w) comes off again
      for (int r = 0; r < R; ++r) s[r][j] = _mm512_dpbusd_epi32(s[r][j], _mm512_loadu_si512(a + r * k + i + j * step), wj);
    }
  }
  __m512i offset = t[0];
  for (int j = 1; j < J; ++j) offset = _mm512_add_epi32(offset, t[j]);
  offset = _mm512_slli_epi32(offset, 7);
  for (int r = 0; r < R; ++r) {
    __m512i sum = s[r][0];
    for (int j = 1; j < J; ++j) sum = _mm512_add_epi32(sum, s[r][j]);
    out[r] = _mm512_reduce_add_epi32(_mm512_sub_epi32(sum, offset));
  }
#else
  constexpr int64_t step = 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) s[r][j] = _mm256_setzero_si256();
  for (; i + J * step <= k; i += J * step) {
    for (int j = 0; j < J; ++j) {
      prefetch(w + i + j * step + kPrefetch);
      const __m256i wj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + j * step));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * k + i + j * step));
        // pairs of |x| * (w with x's sign) fit int16: at most 2 * 127 * 127
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(wj, x));
        s[r][j] = _mm256_add_epi32(s[r][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256i sum = s[r][0];
    for (int j = 1; j < J; ++j) sum = _mm256_add_epi32(sum, s[r][j]);
    const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    const __m128i quarter = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    out[r] = _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 1)));
  }
#endif
  for (int r = 0; r < R; ++r) out[r] += scalar_dot(a + r * k, w, i, k);
}

// The rows of x quantised to int8 (stored as Activation), and each row's scale.
struct QuantisedRows {
  std::vector<Activation> values;
  std::vector<float> scales;
};

QuantisedRows quantise_rows(const float* x, int64_t m, int64_t k) {
  QuantisedRows rows{std::vector<Activation>(m * k), std::vector<float>(m)};
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    float largest = 0.f;
    for (int64_t i = 0; i < k; ++i) largest = std::max(largest, std::abs(row[i]));
    // as int8_activation_products: clamp to the smallest normal float, divide, round to even
    const float s = std::max(largest, std::numeric_limits<float>::min()) / 127.f;
    rows.scales[r] = s;
    for (int64_t i = 0; i < k; ++i) rows.values[r * k + i] = Activation(int32_t(std::nearbyint(row[i] / s)) + kOffset);
  }
  return rows;
}

// out = rows x weights[i]^T * scales[i] for every weight, in one parallel loop over all their
// output rows: one call for the layers that read the same input (q, k and v; gate and up).
std::vector<at::Tensor> int8_linears(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_linear: x must be 2-d float32");
  TORCH_CHECK(weights.size() == scales.size(), "int8_linear: one scale per weight");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  std::vector<at::Tensor> kept, outs;  // contiguous weights and scales (kept alive), outputs
  std::vector<int64_t> starts{0};  // where each weight's rows start among all of them
  // Raw pointers for the loop: data_ptr() is a checked call into libtorch, too slow per row.
  std::vector<const int8_t*> weight_data;
  std::vector<const void*> scale_data;
  std::vector<bool> bf16_scale;
  std::vector<float*> out_data;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& weight = weights[i];
    const at::Tensor& scale = scales[i];
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == k,
                "int8_linear: weight must be int8 of shape (n, ", k, ")");
    TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0), "int8_linear: scale must have shape (",
                weight.size(0), ",)");
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 || scale.scalar_type() == at::kFloat,
                "int8_linear: scale must be bfloat16 or float32");
    kept.push_back(weight.contiguous());
    weight_data.push_back(kept.back().data_ptr<int8_t>());
    kept.push_back(scale.contiguous());
    scale_data.push_back(kept.back().data_ptr());
    bf16_scale.push_back(scale.scalar_type() == at::kBFloat16);
    outs.push_back(at::empty({m, weight.size(0)}, xc.options()));
    out_data.push_back(outs.back().data_ptr<float>());
    starts.push_back(starts.back() + weight.size(0));
  }
  const QuantisedRows rows = quantise_rows(xc.data_ptr<float>(), m, k);

  // A thread gets at least ~64 KiB of weights: below that, waking a second one costs more.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(k, 1));
  at::parallel_for(0, starts.back(), grain, [&](int64_t begin, int64_t end) {
    int32_t sums[4];
    size_t i = 0;
    for (int64_t index = begin; index < end; ++index) {  // each thread reads its weight rows in order
      while (index >= starts[i + 1]) ++i;
      const int64_t o = index - starts[i], n = starts[i + 1] - starts[i];
      const int8_t* wo = weight_data[i] + o * k;
      const float scale = bf16_scale[i] ? float(static_cast<const at::BFloat16*>(scale_data[i])[o])
                                        : static_cast<const float*>(scale_data[i])[o];
      float* out = out_data[i];
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) {
        dots<4>(rows.values.data() + r * k, wo, k, sums);
        for (int j = 0; j < 4; ++j) out[(r + j) * n + o] = float(sums[j]) * rows.scales[r + j] * scale;
      }
      for (; r < m; ++r) {
        dots<1>(rows.values.data() + r * k, wo, k, sums);
        out[r * n + o] = float(sums[0]) * rows.scales[r] * scale;
      }
    }
  });
  return outs;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  return int8_linears(x, {weight}, {scale})[0];
}

}  // namespace

TORCH_LIBRARY(wren_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int8_linears(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(wren_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linears", &int8_linears);
}
