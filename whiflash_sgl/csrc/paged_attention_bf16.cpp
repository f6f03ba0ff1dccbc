// Tree attention over a paged KV pool with bf16 products on AMX (the precision of the target's bf16 matmuls),
// batch-invariant. Queries, keys, values and softmax numerators are rounded to bf16 (nearest even) and multiplied in
// AMX tiles, summing in float32; the pool stays float32.
//
// A row's output is a function of its query and its own visible keys alone: each score is one tile product over the
// head dimension, 32 dims at a time in order; the softmax takes the max and the float32 sum of exponentials over the
// row's keys in order (lane-wise, then across lanes); the output sums p_j v_j over the row's keys in groups of 32 at
// their places in its own list, group after group. A tile computes each of its rows on its own, so a row gets the same
// bits alone, in any batch, in a prefill chunk or a verify tree.
//
// Work items are paged_attention.cpp's: blocks of one request's rows. The keys every row of a block sees (rounded
// down to a multiple of 32, so that a group of 32 is the same group in every row's list) are converted once per head
// into B tiles (keys transposed, for the scores; value pairs interleaved, for the sums) and serve every tile of 16 of
// the block's queries; then each row goes on over its queries' further keys with tiles of its own. A block of fewer
// than 16 queries (decode rows: 3 per KV head for a GQA model) configures tiles of that many rows. The time goes to
// reading and converting the keys and values, which a tree's rows share: that is what makes draft rows cheap. On
// SmolLM2-135M's shapes (2 threads, 16 requests at 800 positions, one layer), against the float32 kernel: 4 rows a
// request 1.43 -> 0.81 ms, 17 rows 5.1 -> 1.7 ms, a 512-row prefill chunk 11.6 -> 3.9 ms; one decode row a request
// 0.63 -> 0.68 ms (converting each key and value to bf16 costs about what its float32 products saved).

#include "amx.h"
#include "attention_common.h"

#include <cstring>
#include <limits>

namespace whiflash {
namespace {

constexpr int64_t kTile = 16;   // rows of a tile: queries of a score or sum tile, keys of a score tile
constexpr int64_t kGroup = 32;  // bf16 values in a tile row (64 bytes): dims of a score step, keys of a sum step

// [m]: sums and scores (tiles 0-3) and queries or numerators (4, 5) of m rows, keys or values (6, 7) of 16: a block
// of fewer than 16 queries (decode rows: 3 for a GQA model) moves only its own rows
struct TileConfigs {
  TileConfig rows[kTile + 1];
};

constexpr TileConfigs tile_configs() {
  TileConfigs all;
  for (int m = 1; m <= kTile; ++m)
    for (int t = 0; t < 8; ++t) {
      all.rows[m].rows[t] = static_cast<uint8_t>(t < 6 ? m : kTile);
      all.rows[m].colsb[t] = 64;
    }
  return all;
}
alignas(64) const TileConfigs kTileConfigs = tile_configs();  // in memory: GCC drops stores into a local config

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// x[0 .. d) -> bf16 pairs (x[2u], x[2u+1]) as 32-bit units u, zeros past d to dk (a multiple of 32)
inline void bf16_units(const float* x, int64_t d, int64_t dk, uint32_t* out) {
  for (int64_t c = 0; c < dk; c += kGroup) {
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(d - c), x + c);
    const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(d - c - kLanes), x + c + kLanes);
    _mm512_storeu_si512(out + c / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// dst[j * 16 + i] = src[i * stride + j] for a 16 x 16 block of 32-bit values
inline void transpose16(const uint32_t* src, int64_t stride, uint32_t* dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * stride);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_si512(dst + c * 16, _mm512_shuffle_i32x4(x0, y0, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * 16, _mm512_shuffle_i32x4(x0, y0, 0xDD));
    _mm512_storeu_si512(dst + (8 + c) * 16, _mm512_shuffle_i32x4(x1, y1, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * 16, _mm512_shuffle_i32x4(x1, y1, 0xDD));
  }
}

// The B tiles of 16 keys for the scores, one per 32 dims: tiles[s][u][i] = unit 16s + u of key i (the last of
// the n keys repeated past n).
void key_tiles(const float* const* keys, int64_t n, int64_t d, int64_t dk, uint32_t* units, uint32_t* tiles) {
  for (int64_t i = 0; i < kTile; ++i) bf16_units(keys[std::min(i, n - 1)], d, dk, units + i * dk / 2);
  for (int64_t s = 0; s < dk / kGroup; ++s) transpose16(units + s * kTile, dk / 2, tiles + s * kTile * kTile);
}

const __m512i kPairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                        21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);

// The B tiles of 32 keys' values for the sums, one per 16 dims: tiles[c][p][i] = (v[2p][16c + i], v[2p+1][16c + i])
// in bf16 (the last of the n keys repeated past n: its numerator there is 0).
void value_tiles(const float* const* values, int64_t n, int64_t d, uint16_t* tiles) {
  for (int64_t p = 0; p < kTile; ++p) {
    const float *a = values[std::min(2 * p, n - 1)], *b = values[std::min(2 * p + 1, n - 1)];
    for (int64_t c = 0; c < d; c += kLanes) {
      const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b + c), _mm512_loadu_ps(a + c));
      _mm512_storeu_si512(tiles + (c / kLanes * kTile + p) * kGroup, _mm512_permutexvar_epi16(kPairs, w));
    }
  }
}

// scores[0 .. n) -> p = exp(scale * s - max) in bf16 at out[0 .. n rounded up to 32), zeros past n; returns the sum
// of the float32 p, lane-wise in key order, then across lanes. scores must have room to n rounded up to 32.
float softmax_bf16(float* scores, int64_t n, float scale, uint16_t* out) {
  const __m512 factor = _mm512_set1_ps(scale);
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 live = first_lanes(n - j);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, scores + j), factor);
    _mm512_storeu_ps(scores + j, x);
    top = _mm512_mask_max_ps(top, live, top, x);
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kGroup) {
    __m512 e[2];
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t at = j + h * kLanes;
      e[h] = _mm512_maskz_mov_ps(first_lanes(n - at), exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + at), shift)));
      sum = _mm512_add_ps(sum, e[h]);
    }
    _mm512_storeu_si512(out + j, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
  }
  return _mm512_reduce_add_ps(sum);
}

// C tiles 0-3 += A (tile 4: 16 queries x 32 keys of numerators at `p`, row stride ld) x the 32 keys' value tiles
// for dims [16 c0, 16 (c0 + blocks)), blocks <= 4
inline void sum_step(const uint16_t* p, int64_t ld, const uint16_t* tiles, int64_t c0, int64_t blocks) {
  _tile_loadd(4, p, ld * 2);
  const uint16_t* t = tiles + c0 * kTile * kGroup;
  _tile_loadd(6, t, 64);
  _tile_dpbf16ps(0, 4, 6);
  if (blocks > 1) {
    _tile_loadd(7, t + kTile * kGroup, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if (blocks > 2) {
    _tile_loadd(6, t + 2 * kTile * kGroup, 64);
    _tile_dpbf16ps(2, 4, 6);
  }
  if (blocks > 3) {
    _tile_loadd(7, t + 3 * kTile * kGroup, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
}

inline void load_sums(const float* s, int64_t ld, int64_t blocks) {
  _tile_loadd(0, s, ld * 4);
  if (blocks > 1) _tile_loadd(1, s + kLanes, ld * 4);
  if (blocks > 2) _tile_loadd(2, s + 2 * kLanes, ld * 4);
  if (blocks > 3) _tile_loadd(3, s + 3 * kLanes, ld * 4);
}

inline void store_sums(float* s, int64_t ld, int64_t blocks) {
  _tile_stored(0, s, ld * 4);
  if (blocks > 1) _tile_stored(1, s + kLanes, ld * 4);
  if (blocks > 2) _tile_stored(2, s + 2 * kLanes, ld * 4);
  if (blocks > 3) _tile_stored(3, s + 3 * kLanes, ld * 4);
}

// C tile 0 = the 16 queries' bf16 units at q (row stride dk/2 units) . the 16 keys' B tiles
inline void score_tile(const uint32_t* q, const uint32_t* tiles, int64_t dk) {
  _tile_zero(0);
  for (int64_t s = 0; s < dk / kGroup; ++s) {
    _tile_loadd(4, q + s * kTile, dk * 2);
    _tile_loadd(6, tiles + s * kTile * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
  }
}

}  // namespace

torch::Tensor paged_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                                   const torch::Tensor& kv_indices, const torch::Tensor& lead,
                                   const torch::Tensor& own_indptr, const torch::Tensor& own, double scale) {
  TORCH_CHECK(amx_permitted(), "paged_attention_bf16: the kernel did not get AMX state from the OS");
  const Call call("paged_attention_bf16", q, k, v, qo_indptr, kv_indptr, kv_indices, lead, own_indptr, own);
  const int64_t group = call.group, d = call.d;
  const int64_t dk = round_up(d, kGroup), blocks_d = d / kLanes;  // dims of a score row; 16-dim blocks of a sum
  const float factor = static_cast<float>(scale);
  call.run([&](auto next) {
    const TileConfig* loaded = nullptr;
    BlockKeys seen;
    HeadRows kv;
    std::vector<uint32_t> queries, units, key_b;  // bf16 queries [query][dk/2]; a key tile's units; shared key tiles
    std::vector<uint16_t> numerators, value_b;    // bf16 [query][widest]; shared value tiles
    std::vector<float> scores, sums, scratch;     // [query][widest], [query][d], one tile's rows
    std::vector<uint32_t> own_keys(dk / 2 * kTile);
    std::vector<uint16_t> own_values;  // a row's further values' tiles
    std::vector<float> inverse;
    units.resize(dk / 2 * kTile);
    scratch.resize(kTile * std::max(d, kTile));
    for (int64_t index = next(); index < call.items.count; index = next()) {
      const Item item(call, index, seen, kGroup);
      const int64_t rows = item.rows, n_q = item.n_q, row0 = item.row0, shared = seen.shared;
      const int64_t widest = round_up(seen.widest, kGroup);
      const int64_t padded = round_up(n_q, kTile) + kTile;  // a row's tile may start at any of its queries
      queries.resize(padded * dk / 2);
      scores.resize(padded * widest);
      numerators.resize(padded * widest);
      sums.resize(padded * d);
      inverse.resize(n_q);
      own_values.resize(round_up(seen.widest - shared, kGroup) * d);
      const TileConfig* config = &kTileConfigs.rows[std::min(n_q, kTile)];
      if (config != loaded) _tile_loadconfig(loaded = config);
      for (int64_t h = item.first_head; h < item.first_head + item.heads; ++h) {
        kv.point(call, item, seen, h);
        for (int64_t m = 0; m < n_q; ++m)
          bf16_units(call.query(row0 + m / group, h * group + m % group), d, dk, queries.data() + m * dk / 2);
        // scores over the shared keys: their tiles once, then every 16 queries against them
        key_b.resize(shared / kTile * dk / 2 * kTile);
        prefetch_rows(kv.shared_k.data(), std::min<int64_t>(shared, 2 * kTile), d);
        for (int64_t j = 0; j < shared; j += kTile) {
          if (j + 2 * kTile < shared) prefetch_rows(kv.shared_k.data() + j + 2 * kTile, kTile, d);
          key_tiles(kv.shared_k.data() + j, kTile, d, dk, units.data(), key_b.data() + j * dk / 2);
        }
        for (int64_t t = 0; t < n_q; t += kTile)
          for (int64_t j = 0; j < shared; j += kTile) {
            score_tile(queries.data() + t * dk / 2, key_b.data() + j * dk / 2, dk);
            _tile_stored(0, scores.data() + t * widest + j, widest * 4);
          }
        // each row's further keys, against its own queries 16 at a time (the tile's other rows are discarded)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < seen.further(r); j += kTile) {
            const int64_t n = std::min(kTile, seen.further(r) - j);
            key_tiles(kv.rest_k.data() + seen.rest_at[r] + j, n, d, dk, units.data(), own_keys.data());
            for (int64_t g0 = 0; g0 < group; g0 += kTile) {
              score_tile(queries.data() + (r * group + g0) * dk / 2, own_keys.data(), dk);
              _tile_stored(0, scratch.data(), kTile * 4);
              for (int64_t g = g0; g < std::min(group, g0 + kTile); ++g)
                std::memcpy(scores.data() + (r * group + g) * widest + shared + j, scratch.data() + (g - g0) * kTile,
                            n * 4);
            }
          }
        for (int64_t m = 0; m < n_q; ++m) {  // a row that sees no key: zeros
          const int64_t n = seen.count(m / group);
          inverse[m] = n ? 1.0f / softmax_bf16(scores.data() + m * widest, n, factor, numerators.data() + m * widest)
                         : 0.0f;
        }
        // sums over the shared values: their tiles once, then every 16 queries' sums, 4 blocks of 16 dims a pass
        value_b.resize(shared * d);
        prefetch_rows(kv.shared_v.data(), std::min<int64_t>(shared, kGroup), d);
        for (int64_t j = 0; j < shared; j += kGroup) {
          if (j + kGroup < shared) prefetch_rows(kv.shared_v.data() + j + kGroup, kGroup, d);
          value_tiles(kv.shared_v.data() + j, kGroup, d, value_b.data() + j * d);
        }
        for (int64_t t = 0; t < n_q; t += kTile)
          for (int64_t c = 0; c < blocks_d; c += 4) {
            const int64_t blocks = std::min<int64_t>(4, blocks_d - c);
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t j = 0; j < shared; j += kGroup)
              sum_step(numerators.data() + t * widest + j, widest, value_b.data() + j * d, c, blocks);
            store_sums(sums.data() + t * d + c * kLanes, d, blocks);
          }
        // each row's further values, going on from its shared sums, its queries 16 at a time
        for (int64_t r = 0; r < rows; ++r) {
          if (!seen.further(r)) continue;
          for (int64_t j = 0; j < seen.further(r); j += kGroup) {  // their tiles, all of the row's at once
            value_tiles(kv.rest_v.data() + seen.rest_at[r] + j, std::min(kGroup, seen.further(r) - j), d,
                        own_values.data() + j * d);
          }
          for (int64_t g0 = 0; g0 < group; g0 += kTile) {
            const int64_t m0 = r * group + g0, count = std::min(kTile, group - g0);
            for (int64_t c = 0; c < blocks_d; c += 4) {
              const int64_t blocks = std::min<int64_t>(4, blocks_d - c);
              load_sums(sums.data() + m0 * d + c * kLanes, d, blocks);
              for (int64_t j = 0; j < seen.further(r); j += kGroup)
                sum_step(numerators.data() + m0 * widest + shared + j, widest, own_values.data() + j * d, c, blocks);
              store_sums(scratch.data(), d, blocks);  // the tile's rows past these queries belong to other rows
              for (int64_t g = 0; g < count; ++g)
                std::memcpy(sums.data() + (m0 + g) * d + c * kLanes, scratch.data() + g * d, blocks * kLanes * 4);
            }
          }
        }
        for (int64_t m = 0; m < n_q; ++m) {
          float* o = call.output(row0 + m / group, h * group + m % group);
          const __m512 inv = _mm512_set1_ps(inverse[m]);
          for (int64_t c = 0; c < d; c += kLanes)
            _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(sums.data() + m * d + c), inv));
        }
      }
    }
    if (loaded) _tile_release();
  });
  return call.out;
}

}  // namespace whiflash
