// The float32 GEMM kernels' weight layout, shared by the AVX-512 (invariant_gemm.cpp) and AVX2
// (invariant_gemm_avx2.cpp) builds, so that both multiply the same panels.
//
// pack() lays W [N, K] out as panels [ceil(N/16)][K][16] (columns zero-padded to a multiple of 16), so that a tile
// streams its weights contiguously: one 512-bit vector, or two 256-bit ones, per k.

#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace whiflash {

constexpr int64_t kLanes = 16;  // the panel width

inline torch::Tensor pack(const torch::Tensor& weight) {
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

// The product of float32 rows [M, K] and pack()'s panels, [M, n]: multiply(xs, ps, ys, m, k, blocks, width) fills
// the column-padded [M, width] output ys.
template <class Multiply>
inline torch::Tensor panel_product(const torch::Tensor& input, const torch::Tensor& panels, int64_t n,
                                   Multiply multiply) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == torch::kFloat, "linear: expected float32 [M, K] rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == input.size(1) && panels.size(2) == kLanes,
              "linear: the rows' width does not match the packed weight");
  const auto x = input.contiguous();
  const int64_t m = x.size(0), k = x.size(1), blocks = panels.size(0), width = blocks * kLanes;
  auto y = torch::empty({m, width}, x.options());
  multiply(x.data_ptr<float>(), panels.data_ptr<float>(), y.data_ptr<float>(), m, k, blocks, width);
  return width == n ? y : y.narrow(1, 0, n).contiguous();
}

// Row groups of at most `most` rows, balanced (26 rows by 8 run as 7, 7, 6, 6, not 8, 8, 8, 2): calls
// run(first row, rows) for each, in order.
template <class Run>
inline void row_groups(int64_t m, int64_t most, Run run) {
  const int64_t groups = (m + most - 1) / most;
  for (int64_t g = 0, row = 0; g < groups; ++g) {
    const int64_t rows = (m - row) / (groups - g);
    run(row, rows);
    row += rows;
  }
}

}  // namespace whiflash
