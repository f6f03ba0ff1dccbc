// Tree attention over a paged KV pool in float32 on AVX-512 CPUs, batch-invariant.
//
// A row's output is a function of its query and its own visible keys alone, computed in one fixed order: each score
// is q.k with the head dimension's lanes summed by one tree (sum_lanes16), at the key's place in blocks of 16 of the
// row's visible keys; the softmax takes the max and the sum of exponentials over the visible keys in order; the
// output sums p_j v_j in a single running sum per 16 dims, in key order. So a row gets the same bits alone, in any
// batch, in a prefill chunk or a verify tree: with bf16-rounded matmul inputs a last-bit difference in attention would
// otherwise flip roundings and grow into different logits.
//
// For speed, one work item is a block of query rows of one request (4 to 64, as many as keep the threads busy) and its
// KV heads (with the query heads that share each): the keys every row of the block sees first (the cached context, a
// prefill chunk's causal prefix) are loaded once for all of its queries, scores 16 keys at a time and values a tile
// of 64 keys at a time, one 16-dim slice at a time into up to 12 running sums per pass; each row then goes on alone
// over the keys only it sees. Splitting a row's keys between the two phases moves no operation, so the blocks do
// not change the bits. Which keys a row sees is read from the mask once per forward (visible_keys), not per layer.

#include "attention_common.h"

#include <limits>

namespace whiflash {
namespace {

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

// scores[0 .. n) -> exp(scores - max), in place; returns their sum (lane-wise in key order, then across lanes)
float softmax_numerators(float* scores, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 live = first_lanes(n - j);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), shift)));
    _mm512_mask_storeu_ps(scores + j, live, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

constexpr int64_t kSums = 12;  // running sums one pass over the values keeps in registers
constexpr int64_t kTile = 64;  // values one pass over them serves every query with before the next (16 KB at d 64)

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

std::vector<torch::Tensor> visible_keys(const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                                        const torch::Tensor& mask, const torch::Tensor& mask_indptr) {
  const auto qo = qo_indptr.contiguous(), kvp = kv_indptr.contiguous(), mk = mask.contiguous(),
             mkp = mask_indptr.contiguous();
  const int64_t batch = qo.numel() - 1, *qo_p = qo.data_ptr<int64_t>(), *kv_p = kvp.data_ptr<int64_t>();
  const bool causal = mk.numel() == 0;
  auto lead = torch::empty({qo_p[batch]}, qo.options());
  auto own_indptr = torch::zeros({qo_p[batch] + 1}, qo.options());
  int64_t *lead_p = lead.data_ptr<int64_t>(), *own_p = own_indptr.data_ptr<int64_t>();
  std::vector<int64_t> own;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = qo_p[b + 1] - qo_p[b], kv_len = kv_p[b + 1] - kv_p[b];
    for (int64_t i = 0; i < q_len; ++i) {
      const int64_t row = qo_p[b] + i;
      if (causal) {
        lead_p[row] = kv_len - q_len + i + 1;
      } else {
        const bool* sees = mk.data_ptr<bool>() + mkp.data_ptr<int64_t>()[b] + i * kv_len;
        int64_t n = 0;
        while (n < kv_len && sees[n]) ++n;
        lead_p[row] = n;
        for (int64_t j = n + 1; j < kv_len; ++j)
          if (sees[j]) own.push_back(j);
      }
      own_p[row + 1] = static_cast<int64_t>(own.size());
    }
  }
  return {lead, own_indptr, torch::tensor(own, qo.options())};
}

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                              const torch::Tensor& kv_indices, const torch::Tensor& lead,
                              const torch::Tensor& own_indptr, const torch::Tensor& own, double scale) {
  const Call call("paged_attention", q, k, v, qo_indptr, kv_indptr, kv_indices, lead, own_indptr, own);
  const int64_t group = call.group, d = call.d;
  const __m512 scale16 = _mm512_set1_ps(static_cast<float>(scale));
  call.run([&](auto next) {
    BlockKeys seen;
    HeadRows kv;
    std::vector<float> scores, sums, inverse;  // [query][key], [query][dim], [query]
    std::vector<const float*> queries;
    std::vector<float*> probs, tail;
    for (int64_t index = next(); index < call.items.count; index = next()) {
      const Item item(call, index, seen, kLanes);
      const int64_t rows = item.rows, n_q = item.n_q, row0 = item.row0, shared = seen.shared;
      const int64_t widest = seen.widest + kLanes;  // room for a padded last block
      const std::vector<int64_t>& rest_at = seen.rest_at;
      for (int64_t h = item.first_head; h < item.first_head + item.heads; ++h) {
        kv.point(call, item, seen, h);
        scores.resize(n_q * widest);
        sums.assign(n_q * d, 0.0f);
        queries.resize(n_q);
        probs.resize(n_q);
        tail.resize(n_q);
        for (int64_t m = 0; m < n_q; ++m) {
          queries[m] = call.query(row0 + m / group, h * group + m % group);
          probs[m] = scores.data() + m * widest;
          tail[m] = probs[m] + shared;
        }
        prefetch_rows(kv.shared_k.data(), std::min<int64_t>(shared, 2 * kLanes), d);
        for (int64_t j = 0; j < shared; j += kLanes) {  // the shared keys: each block of 16 loaded once for every query
          const int64_t ahead = j + 2 * kLanes;  // the block two on, if there is one
          if (ahead < shared) prefetch_rows(kv.shared_k.data() + ahead, std::min(kLanes, shared - ahead), d);
          for (int64_t m = 0; m < n_q; ++m)
            _mm512_storeu_ps(probs[m] + j, _mm512_mul_ps(dots16(queries[m], kv.shared_k.data() + j, d), scale16));
        }
        for (int64_t r = 0; r < rows; ++r) {  // each row's further keys, the last block padded with its last key
          const float* const* keys = kv.rest_k.data() + rest_at[r];
          const int64_t n = rest_at[r + 1] - rest_at[r];
          for (int64_t j = 0; j < n; j += kLanes) {
            const float* block[kLanes];
            for (int64_t l = 0; l < kLanes; ++l) block[l] = keys[std::min(j + l, n - 1)];
            const __mmask16 live = first_lanes(n - j);
            for (int64_t g = 0; g < group; ++g) {
              const __m512 dots = _mm512_mul_ps(dots16(queries[r * group + g], block, d), scale16);
              _mm512_mask_storeu_ps(tail[r * group + g] + j, live, dots);
            }
          }
        }
        inverse.resize(n_q);
        for (int64_t m = 0; m < n_q; ++m) {
          const int64_t n = shared + rest_at[m / group + 1] - rest_at[m / group];
          inverse[m] = n ? 1.0f / softmax_numerators(probs[m], n) : 0.0f;  // a row that sees no key: zeros
        }
        // the shared values a tile at a time, every query's sums going on in key order, so a tile serves them all
        prefetch_rows(kv.shared_v.data(), std::min<int64_t>(shared, 2 * kLanes), d);
        for (int64_t t = 0; t < shared; t += kTile)
          for (int64_t c = 0; c < d; c += kLanes)
            accumulate(probs.data(), kv.shared_v.data(), t, std::min(t + kTile, shared), c, d, n_q, sums.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < d; c += kLanes)
            accumulate(tail.data() + r * group, kv.rest_v.data() + rest_at[r], 0, rest_at[r + 1] - rest_at[r], c, d,
                       group, sums.data() + r * group * d);
        for (int64_t m = 0; m < n_q; ++m) {
          float* o = call.output(row0 + m / group, h * group + m % group);
          const __m512 inv = _mm512_set1_ps(inverse[m]);
          for (int64_t c = 0; c < d; c += kLanes)
            _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(sums.data() + m * d + c), inv));
        }
      }
    }
  });
  return call.out;
}

}  // namespace whiflash
