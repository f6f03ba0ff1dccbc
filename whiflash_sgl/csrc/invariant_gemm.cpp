// y = x . W^T in float32 for the target's linear layers on AVX-512 CPUs: batch-invariant and fast at few rows.
//
// pack() lays W [N, K] out as panels [ceil(N/16)][K][16] (columns zero-padded to a multiple of 16), so that a tile
// streams its weights contiguously. linear() computes tiles of up to 8 rows x 32 columns in 16 vector accumulators,
// k = 0 .. K-1 in order: every output element is the same chain of fused multiply-adds whatever the number of rows or
// the tile it falls in, so a row's result does not depend on the batch around it. MKL's sgemm packs per call and
// runs 2-3x under this CPU's peak at 2-16 rows, which is the shape of a verify pass.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kLanes = 16;  // floats per 512-bit vector: the panel width
constexpr int64_t kMaxRows = 8;

torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat, "pack: expected a float32 [N, K] weight");
  const auto w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = (n + kLanes - 1) / kLanes;
  auto panels = torch::zeros({blocks, k, kLanes}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < kLanes && b * kLanes + j < n; ++j)
      for (int64_t i = 0; i < k; ++i) dst[(b * k + i) * kLanes + j] = src[(b * kLanes + j) * k + i];
  return panels;
}

// rows x[0 .. ROWS) times one or two panels, into y (row stride ldy)
template <int ROWS>
void tile(const float* x, int64_t k, const float* p0, const float* p1, bool two, float* y, int64_t ldy) {
  __m512 acc0[ROWS], acc1[ROWS];
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  if (two) {
    for (int64_t i = 0; i < k; ++i) {
      const __m512 w0 = _mm512_loadu_ps(p0 + i * kLanes), w1 = _mm512_loadu_ps(p1 + i * kLanes);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 xi = _mm512_set1_ps(x[r * k + i]);
        acc0[r] = _mm512_fmadd_ps(xi, w0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(xi, w1, acc1[r]);
      }
    }
  } else {
    for (int64_t i = 0; i < k; ++i) {
      const __m512 w0 = _mm512_loadu_ps(p0 + i * kLanes);
      for (int r = 0; r < ROWS; ++r) acc0[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), w0, acc0[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(y + r * ldy, acc0[r]);
    if (two) _mm512_storeu_ps(y + r * ldy + kLanes, acc1[r]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, const float*, bool, float*, int64_t);
constexpr Tile kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& panels, int64_t n) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == torch::kFloat, "linear: expected float32 [M, K] rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == input.size(1) && panels.size(2) == kLanes,
              "linear: the rows' width does not match the packed weight");
  const auto x = input.contiguous();
  const int64_t m = x.size(0), k = x.size(1), blocks = panels.size(0), width = blocks * kLanes;
  auto y = torch::empty({m, width}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ps = panels.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t groups = (m + kMaxRows - 1) / kMaxRows;  // balanced: 26 rows run as 7, 7, 6, 6, not 8, 8, 8, 2
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = 2 * pair;
      const bool two = b + 1 < blocks;
      const float* p0 = ps + b * k * kLanes;
      for (int64_t g = 0, row = 0; g < groups; ++g) {
        const int64_t rows = (m - row) / (groups - g);
        kTiles[rows](xs + row * k, k, p0, p0 + k * kLanes, two, ys + row * width + b * kLanes, width);
        row += rows;
      }
    }
  });
  return width == n ? y : y.narrow(1, 0, n).contiguous();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "float32 [N, K] weight -> [ceil(N/16), K, 16] panels");
  m.def("linear", &linear, "rows [M, K] . W^T with W packed, batch-invariant");
}
