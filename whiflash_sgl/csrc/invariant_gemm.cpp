// y = x . W^T for the target's linear layers on AVX-512 CPUs: batch-invariant and fast at few rows.
//
// float32: linear() takes pack()'s panels (gemm_panels.h) and computes tiles of up to 8 rows x 32 columns in 16
// vector accumulators, k = 0 .. K-1 in order: every output element is the same chain of fused multiply-adds
// whatever the number of rows or the tile it falls in, so a row's result does not depend on the batch around it. MKL's sgemm packs per call and
// runs 2-3x under this CPU's peak at 2-16 rows, which is the shape of a verify pass.
//
// bfloat16 products: pack_bf16() rounds W to bf16 in AMX's B-tile layout [2 ceil(N/32)][ceil(K/32)][16][16][2]
// (k pairs interleaved per column); linear_bf16() rounds the rows to bf16 and, where the OS grants AMX, multiplies
// tiles of up to 32 rows x 32 columns (the last ones cut to the rows left) with TDPBF16PS, k blocks in order,
// accumulating in float32. Each row of a tile is computed on its own, so here too a row's result does not depend on
// the rows beside it. Half the weight bytes and ~8x the multiply rate of float32 FMAs: a verify pass's extra rows
// cost next to nothing while the weights are streamed once. Without AMX, on CPUs with AVX512-BF16 (AMD Zen 4, Intel
// Cooper Lake), the same panels are read one k pair at a time (a B tile's row: 16 columns x 2 bf16, one vector) by
// VDPBF16PS in tiles of up to 8 rows x 32 columns, one chain of pair products per output element, k pairs in order:
// batch-invariant as well, and 1.6-2x the float32 kernel from 1 to 64 rows on a Zen 4 (the 49k LM head at 8 rows
// 1.6 against 2.9 ms, at 64 rows 9.1 against 17.7). The two paths round their sums differently, so they are not the
// same bits as each other.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx.h"
#include "gemm_panels.h"

namespace whiflash {

constexpr int64_t kMaxRows = 8;

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
  return panel_product(input, panels, n, [](const float* xs, const float* ps, float* ys, int64_t m, int64_t k,
                                            int64_t blocks, int64_t width) {
    at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = 2 * pair;
        const bool two = b + 1 < blocks;
        const float* p0 = ps + b * k * kLanes;
        row_groups(m, kMaxRows, [&](int64_t row, int64_t rows) {
          kTiles[rows](xs + row * k, k, p0, p0 + k * kLanes, two, ys + row * width + b * kLanes, width);
        });
      }
    });
  });
}

constexpr int64_t kTileRows = 16;  // AMX: rows of a tile, and k pairs of a B tile
constexpr int64_t kTileK = 32;     // bf16 values of k per tile row (64 bytes)

bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTiledata) == 0;
  return ok;
}

torch::Tensor pack_bf16(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_floating_point(), "pack_bf16: expected an [N, K] weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t blocks = (n + 2 * kLanes - 1) / (2 * kLanes) * 2, kblocks = (k + kTileK - 1) / kTileK;  // even
  auto w = torch::constant_pad_nd(weight.to(torch::kBFloat16), {0, kblocks * kTileK - k, 0, blocks * kLanes - n});
  // [block, column, kblock, pair, 2] -> [block, kblock, pair, column, 2]
  return w.view({blocks, kLanes, kblocks, kTileRows, 2}).permute({0, 2, 3, 1, 4}).contiguous();
}

// float32 rows [m, k] -> bf16 rows of stride ld, rounded to nearest even (as torch rounds; inputs are finite)
void round_to_bf16(const float* src, int64_t m, int64_t k, uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) {
      uint32_t bits;
      std::memcpy(&bits, src + r * k + i, 4);
      dst[r * ld + i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
}

// tmm0-3: outputs of two row tiles x two 16-column blocks; tmm4, tmm5: the row tiles of x; tmm6, tmm7: weights.
// The first row tile has `first` rows, the second `second`: a call's last tiles hold only its remaining rows, so
// that 17 rows cost a 16-row tile and a 1-row one, not two full tiles. Constants in memory: GCC 12 drops stores
// into a local config as dead, not seeing that ldtilecfg reads them.
struct TileConfigs {
  TileConfig two[kTileRows + 1];  // [t]: a full tile, then one of t rows
  TileConfig one[kTileRows + 1];  // [t]: one tile of t rows
};

constexpr TileConfig tile_config(int first, int second) {
  TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.rows[t] = static_cast<uint8_t>(first), cfg.colsb[t] = 64;
  for (int t : {2, 3, 5}) cfg.rows[t] = static_cast<uint8_t>(second), cfg.colsb[t] = 64;
  for (int t : {6, 7}) cfg.rows[t] = kTileRows, cfg.colsb[t] = 64;
  return cfg;
}

constexpr TileConfigs tile_configs() {
  TileConfigs all;
  for (int t = 1; t <= kTileRows; ++t) all.two[t] = tile_config(kTileRows, t), all.one[t] = tile_config(t, t);
  return all;
}
alignas(64) const TileConfigs kTileConfigs = tile_configs();

// y[row .. row + 16 * tiles) x [two blocks] for one or two row tiles; each weight tile loaded once serves both
template <int TILES>
void amx_tiles(const uint16_t* x, int64_t kp, const uint16_t* p0, const uint16_t* p1, int64_t kblocks, float* y,
               int64_t width) {
  constexpr int64_t kPanel = kTileRows * kLanes * 2;  // bf16 values per B tile
  _tile_zero(0);
  _tile_zero(1);
  if (TILES == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, x + kb * kTileK, kp * 2);
    if (TILES == 2) _tile_loadd(5, x + kTileRows * kp + kb * kTileK, kp * 2);
    _tile_loadd(6, p0 + kb * kPanel, 64);
    _tile_loadd(7, p1 + kb * kPanel, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (TILES == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, y, width * 4);
  _tile_stored(1, y + kLanes, width * 4);
  if (TILES == 2) {
    _tile_stored(2, y + kTileRows * width, width * 4);
    _tile_stored(3, y + kTileRows * width + kLanes, width * 4);
  }
}

bool bf16_dot_runs() { return __builtin_cpu_supports("avx512bf16"); }

// rows x[0 .. ROWS) (bf16, k pairs as 32-bit words) times two 16-column blocks of pack_bf16's panels, into y
template <int ROWS>
void dot_tile(const uint32_t* x, int64_t pairs, const uint16_t* p0, const uint16_t* p1, float* y, int64_t ldy) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    const auto w0 = (__m512bh)_mm512_loadu_si512(p0 + i * 2 * kLanes);
    const auto w1 = (__m512bh)_mm512_loadu_si512(p1 + i * 2 * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const auto xi = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + i]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xi, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xi, w1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(y + r * ldy, acc0[r]);
    _mm512_storeu_ps(y + r * ldy + kLanes, acc1[r]);
  }
}

using DotTile = void (*)(const uint32_t*, int64_t, const uint16_t*, const uint16_t*, float*, int64_t);
constexpr DotTile kDotTiles[kMaxRows + 1] = {nullptr,         dot_tile<1>, dot_tile<2>, dot_tile<3>, dot_tile<4>,
                                             dot_tile<5>,     dot_tile<6>, dot_tile<7>, dot_tile<8>};

torch::Tensor linear_bf16(const torch::Tensor& input, const torch::Tensor& panels, int64_t n) {
  const bool amx = amx_permitted();
  TORCH_CHECK(amx || bf16_dot_runs(), "linear_bf16: this CPU has neither AMX (granted by the OS) nor AVX512-BF16");
  TORCH_CHECK(input.dim() == 2 && panels.dim() == 5 && panels.scalar_type() == torch::kBFloat16 &&
                  panels.size(0) % 2 == 0,
              "linear_bf16: expected [M, K] rows and pack_bf16's panels");
  const int64_t m = input.size(0), k = input.size(1), blocks = panels.size(0), kblocks = panels.size(1);
  TORCH_CHECK((k + kTileK - 1) / kTileK == kblocks, "linear_bf16: the rows' width does not match the packed weight");
  const int64_t mp = (m + kTileRows - 1) / kTileRows * kTileRows, kp = kblocks * kTileK, width = blocks * kLanes;
  const auto x32 = input.to(torch::kFloat).contiguous();
  auto x = torch::zeros({mp, kp}, input.options().dtype(torch::kBFloat16));
  const auto* xs = reinterpret_cast<uint16_t*>(x.data_ptr());
  round_to_bf16(x32.data_ptr<float>(), m, k, reinterpret_cast<uint16_t*>(x.data_ptr()), kp);
  auto y = torch::empty({mp, width}, input.options().dtype(torch::kFloat));
  const auto* ps = reinterpret_cast<const uint16_t*>(panels.data_ptr());
  float* ys = y.data_ptr<float>();
  const int64_t panel = kblocks * kTileRows * kLanes * 2;  // bf16 values of one 16-column block
  if (!amx) {
    const auto* x_pairs = reinterpret_cast<const uint32_t*>(xs);  // a row's k pairs as 32-bit words
    at::parallel_for(0, blocks / 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const uint16_t* p0 = ps + 2 * pair * panel;
        row_groups(m, kMaxRows, [&](int64_t row, int64_t rows) {
          kDotTiles[rows](x_pairs + row * kp / 2, kp / 2, p0, p0 + panel, ys + row * width + 2 * pair * kLanes, width);
        });
      }
    });
    const auto rows = y.narrow(0, 0, m);
    return width == n ? rows : rows.narrow(1, 0, n).contiguous();
  }
  // rows in pairs of full tiles, then the rest (0-31 rows) in one or two tiles of their own sizes
  const int64_t pairs = m / (2 * kTileRows), tail = pairs * 2 * kTileRows, rest = m - tail;
  const TileConfig* full = &kTileConfigs.two[kTileRows];
  const TileConfig* last = rest == 0 ? nullptr
                           : rest <= kTileRows ? &kTileConfigs.one[rest] : &kTileConfigs.two[rest - kTileRows];
  at::parallel_for(0, blocks / 2, 1, [&](int64_t begin, int64_t end) {
    const TileConfig* loaded = nullptr;
    for (int64_t pair = begin; pair < end; ++pair) {
      const uint16_t* p0 = ps + 2 * pair * panel;
      float* y0 = ys + 2 * pair * kLanes;
      if (pairs && loaded != full) _tile_loadconfig(loaded = full);
      for (int64_t row = 0; row < tail; row += 2 * kTileRows)
        amx_tiles<2>(xs + row * kp, kp, p0, p0 + panel, kblocks, y0 + row * width, width);
      if (!rest) continue;
      if (loaded != last) _tile_loadconfig(loaded = last);
      if (rest <= kTileRows)
        amx_tiles<1>(xs + tail * kp, kp, p0, p0 + panel, kblocks, y0 + tail * width, width);
      else
        amx_tiles<2>(xs + tail * kp, kp, p0, p0 + panel, kblocks, y0 + tail * width, width);
    }
    if (loaded) _tile_release();
  });
  const auto rows = y.narrow(0, 0, m);
  return width == n ? rows : rows.narrow(1, 0, n).contiguous();
}

}  // namespace whiflash
