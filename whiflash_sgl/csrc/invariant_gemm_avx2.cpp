// The float32 kernel of invariant_gemm.cpp for CPUs with AVX2 and FMA but not AVX-512, built as a module of its own
// (cpu_extension.py's avx2_gemm).
//
// The same panels (gemm_panels.h) and the same arithmetic: every output element is one chain of fused multiply-adds
// over k = 0 .. K-1 in order, from zero, so a row's result depends neither on the batch around it nor on which of
// the two builds computed it. Sixteen 256-bit registers hold tiles of up to 6 rows x 16 columns (12 accumulators,
// the panel's two weight vectors, one broadcast row value). On an AVX2-only EPYC, MKL's sgemm took 2.2-2.5x its
// one-row time for 2-8 rows, which is what a verify pass and a batch of requests are.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#include "gemm_panels.h"

namespace whiflash {

constexpr int64_t kMaxRows = 6;

// rows x[0 .. ROWS) times one panel, into y (row stride ldy)
template <int ROWS>
void tile(const float* x, int64_t k, const float* p, float* y, int64_t ldy) {
  __m256 lo[ROWS], hi[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const __m256 w0 = _mm256_loadu_ps(p + i * kLanes), w1 = _mm256_loadu_ps(p + i * kLanes + 8);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xi = _mm256_broadcast_ss(x + r * k + i);
      lo[r] = _mm256_fmadd_ps(xi, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xi, w1, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(y + r * ldy, lo[r]);
    _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr Tile kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& panels, int64_t n) {
  return panel_product(input, panels, n, [](const float* xs, const float* ps, float* ys, int64_t m, int64_t k,
                                            int64_t blocks, int64_t width) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        row_groups(m, kMaxRows, [&](int64_t row, int64_t rows) {
          kTiles[rows](xs + row * k, k, ps + b * k * kLanes, ys + row * width + b * kLanes, width);
        });
    });
  });
}

}  // namespace whiflash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &whiflash::pack, "float32 [N, K] weight -> [ceil(N/16), K, 16] panels");
  m.def("linear", &whiflash::linear, "rows [M, K] . W^T with W packed, batch-invariant (AVX2)");
}
