// Tree attention over a paged KV pool in float32 on AVX-512 CPUs, batch-invariant.
//
// A row's output is a function of its query and its own visible keys alone, computed in one fixed order: each score
// is q.k with the head dimension's lanes summed by one tree (sum_lanes16), at the key's place in blocks of 16 of the
// row's visible keys; the softmax takes the max and the sum of exponentials over the visible keys in order; the
// output sums p_j v_j in a single running sum per 16 dims, in key order. So a row gets the same bits alone, in any
// batch, in a prefill chunk or a verify tree: with bf16-rounded matmul inputs a last-bit difference in attention would
// otherwise flip roundings and grow into different logits.
//
// For speed, one work item is a block of up to four query rows of one request and one KV head (with the query heads
// that share it): the keys every row of the block sees first (the cached context, a prefill chunk's causal prefix)
// are loaded once for all of its queries, scores 16 keys at a time and values one 16-dim slice at a time into up
// to 12 running sums; each row then goes on alone over the keys only it sees. Splitting a row's keys between the
// two phases moves no operation, so the blocks do not change the bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace whiflash {
namespace {

constexpr int64_t kLanes = 16;

// e^x, Cephes' single-precision polynomial with the exponent applied by scalef
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// [sum of v[i]'s lanes for i = 0 .. 15]: pairwise across registers, the same tree for every key
inline __m512 sum_lanes16(const __m512* v) {
  __m512 u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
}

// q . keys[i] for 16 keys at once (each key's lanes summed by sum_lanes16, not one by one)
inline __m512 dots16(const float* q, const float* const* keys, int64_t d) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(keys[i]));
    for (int64_t c = kLanes; c < d; c += kLanes)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(keys[i] + c), acc);
    v[i] = acc;
  }
  return sum_lanes16(v);
}

// asks for the d floats at each of rows[0 .. count) to be brought into cache: keys and values live in pool rows
// scattered over tens of megabytes per layer, so a pass over them waits on memory unless it asks ahead
inline void prefetch_rows(const float* const* rows, int64_t count, int64_t d) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t c = 0; c < d; c += kLanes) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c), _MM_HINT_T0);
}

// scores[0 .. n) -> exp(scores - max), in place; returns their sum (lane-wise in key order, then across lanes)
float softmax_numerators(float* scores, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 live = n - j >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), shift)));
    _mm512_mask_storeu_ps(scores + j, live, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

constexpr int64_t kSums = 12;  // running sums one pass over the values keeps in registers

// sums[m][c .. c+16) += p[m][j] * values[j][c .. c+16) for keys j in [begin, end), in key order, for M queries
template <int M>
void weighted_sums(float* const* p, const float* const* values, int64_t begin, int64_t end, int64_t c, int64_t d,
                   float* sums) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_loadu_ps(sums + m * d + c);
  for (int64_t j = begin; j < end; ++j) {
    // on the first slice, ask for the row 32 keys on: the later slices find every row in cache
    if (c == 0 && j + 2 * kLanes < end) prefetch_rows(values + j + 2 * kLanes, 1, d);
    const __m512 x = _mm512_loadu_ps(values[j] + c);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(p[m][j]), x, acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(sums + m * d + c, acc[m]);
}

using WeightedSums = void (*)(float* const*, const float* const*, int64_t, int64_t, int64_t, int64_t, float*);

template <int... M>
constexpr std::array<WeightedSums, sizeof...(M)> weighted_sums_table(std::integer_sequence<int, M...>) {
  return {weighted_sums<M + 1>...};
}

constexpr auto kWeightedSums = weighted_sums_table(std::make_integer_sequence<int, kSums>{});

// weighted_sums for `count` queries (query m's sums at sums + m * d), kSums at a time
void accumulate(float* const* p, const float* const* values, int64_t begin, int64_t end, int64_t c, int64_t d,
                int64_t count, float* sums) {
  if (begin >= end) return;
  for (int64_t m = 0; m < count; m += kSums)
    kWeightedSums[std::min(kSums, count - m) - 1](p + m, values, begin, end, c, d, sums + m * d);
}

}  // namespace

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                              const torch::Tensor& kv_indices, const torch::Tensor& mask,
                              const torch::Tensor& mask_indptr, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "paged_attention: expected [rows, heads, dim] q, k, v");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "paged_attention: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "paged_attention: head dim must be dense");
  const int64_t total_q = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), group = hq / hkv;
  TORCH_CHECK(d % kLanes == 0 && hq % hkv == 0 && v.size(2) == d, "paged_attention: head dim a multiple of 16");
  const auto qo = qo_indptr.contiguous(), kvp = kv_indptr.contiguous(), idx = kv_indices.contiguous();
  const auto mk = mask.contiguous(), mkp = mask_indptr.contiguous();
  const int64_t* qo_p = qo.data_ptr<int64_t>();
  const int64_t* kv_p = kvp.data_ptr<int64_t>();
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  const bool causal = mk.numel() == 0;
  const bool* mask_p = causal ? nullptr : mk.data_ptr<bool>();
  const int64_t* mask_off = causal ? nullptr : mkp.data_ptr<int64_t>();
  const int64_t rows_per_item = std::max<int64_t>(1, kSums / group);
  std::vector<std::array<int64_t, 3>> blocks;  // (request, first row, end row)
  for (int64_t b = 0; b + 1 < qo.numel(); ++b)
    for (int64_t i = 0; i < qo_p[b + 1] - qo_p[b]; i += rows_per_item)
      blocks.push_back({b, i, std::min(i + rows_per_item, qo_p[b + 1] - qo_p[b])});
  auto out = torch::zeros({total_q, hq, d}, q.options());
  const float *qs = q.data_ptr<float>(), *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t q0 = q.stride(0), q1 = q.stride(1), k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0),
                v1 = v.stride(1);
  const __m512 scale16 = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, static_cast<int64_t>(blocks.size()) * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::vector<int64_t>> seen;  // each row's visible keys, by index in its request
    std::vector<std::vector<const float*>> kv;  // ... their key rows, then their value rows
    std::vector<float> scores, sums, inverse;  // [query][key], [query][dim], [query]
    std::vector<const float*> queries;
    std::vector<float*> probs;
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, i0, i1] = blocks[item / hkv];
      const int64_t h = item % hkv, rows = i1 - i0, n_q = rows * group;
      const int64_t q_len = qo_p[b + 1] - qo_p[b], first = kv_p[b], kv_len = kv_p[b + 1] - first;
      seen.resize(rows);
      kv.resize(2 * rows);
      int64_t widest = 0, shared = kv_len;  // shared: how many leading keys every row of the block sees
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        auto& keys = seen[r];
        keys.clear();
        if (causal) {
          for (int64_t j = 0; j <= kv_len - q_len + i; ++j) keys.push_back(j);
        } else {
          const bool* sees = mask_p + mask_off[b] + i * kv_len;
          for (int64_t j = 0; j < kv_len; ++j)
            if (sees[j]) keys.push_back(j);
        }
        int64_t lead = 0;
        while (lead < static_cast<int64_t>(keys.size()) && keys[lead] == lead) ++lead;
        shared = std::min(shared, lead);
        widest = std::max<int64_t>(widest, keys.size());
        kv[r].resize(keys.size());
        kv[rows + r].resize(keys.size());
        for (size_t j = 0; j < keys.size(); ++j) {
          const int64_t row = idx_p[first + keys[j]];
          kv[r][j] = ks + row * k0 + h * k1;
          kv[rows + r][j] = vs + row * v0 + h * v1;
        }
      }
      shared -= shared % kLanes;  // whole blocks of 16: a key's place in its block is its place in every row's list
      scores.assign(n_q * widest, 0.0f);
      sums.assign(n_q * d, 0.0f);
      queries.resize(n_q);
      probs.resize(n_q);
      for (int64_t m = 0; m < n_q; ++m) {
        queries[m] = qs + (qo_p[b] + i0 + m / group) * q0 + (h * group + m % group) * q1;
        probs[m] = scores.data() + m * widest;
      }
      prefetch_rows(kv[0].data(), std::min<int64_t>(shared, 2 * kLanes), d);
      for (int64_t j = 0; j < shared; j += kLanes) {  // the shared keys: each block of 16 loaded once for every query
        const int64_t ahead = j + 2 * kLanes;  // the block two on, if there is one
        if (ahead < shared) prefetch_rows(kv[0].data() + ahead, std::min(kLanes, shared - ahead), d);
        for (int64_t m = 0; m < n_q; ++m)
          _mm512_storeu_ps(probs[m] + j, _mm512_mul_ps(dots16(queries[m], kv[0].data() + j, d), scale16));
      }
      prefetch_rows(kv[rows].data(), std::min<int64_t>(shared, 2 * kLanes), d);  // the values, for the first slice
      for (int64_t r = 0; r < rows; ++r) {  // each row's own keys, the last block padded with its last key
        auto& keys = kv[r];
        const int64_t n = keys.size();
        for (int64_t j = shared; j < n; j += kLanes) {
          const float* block[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) block[l] = keys[std::min(j + l, n - 1)];
          const __mmask16 live = n - j >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
          for (int64_t g = 0; g < group; ++g) {
            const __m512 dots = _mm512_mul_ps(dots16(queries[r * group + g], block, d), scale16);
            _mm512_mask_storeu_ps(probs[r * group + g] + j, live, dots);
          }
        }
      }
      inverse.resize(n_q);
      for (int64_t m = 0; m < n_q; ++m) {
        const int64_t n = kv[m / group].size();
        inverse[m] = n ? 1.0f / softmax_numerators(probs[m], n) : 0.0f;  // a row that sees no key: zeros
      }
      for (int64_t c = 0; c < d; c += kLanes) {
        accumulate(probs.data(), kv[rows].data(), 0, shared, c, d, n_q, sums.data());  // where every row's list agrees
        for (int64_t r = 0; r < rows; ++r)
          accumulate(probs.data() + r * group, kv[rows + r].data(), shared, kv[r].size(), c, d, group,
                     sums.data() + r * group * d);
      }
      for (int64_t m = 0; m < n_q; ++m) {
        float* o = os + ((qo_p[b] + i0 + m / group) * hq + h * group + m % group) * d;
        const __m512 inv = _mm512_set1_ps(inverse[m]);
        for (int64_t c = 0; c < d; c += kLanes)
          _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(sums.data() + m * d + c), inv));
      }
    }
  });
  return out;
}

}  // namespace whiflash
