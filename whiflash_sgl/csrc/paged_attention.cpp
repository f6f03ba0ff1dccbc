// Tree attention over a paged KV pool in float32 on AVX-512 CPUs, batch-invariant.
//
// One work item is one query row and one KV head (with the query heads that share it). The row's visible keys are
// read straight from the pool rows its request's page table names (no gathered copy), scores are q.k in a fixed
// order over the head dimension, the softmax takes the max and the sum of exponentials over the visible keys in
// key order, and the output sums p_j v_j in key order (four interleaved running sums: the split is fixed by the row's
// own key count, as is the split of scores into blocks of 16 keys). Nothing depends on the other rows of the batch,
// so a row gets the same bits alone, in any batch, in a prefill chunk or a verify tree: with bf16-rounded matmul
// inputs a last-bit difference in attention would otherwise flip roundings and grow into different logits.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t c = kLanes; c < d; c += kLanes)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
  return _mm512_reduce_add_ps(acc);
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
  const int64_t batch = qo.numel() - 1;
  std::vector<int64_t> request_of(total_q);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = qo_p[b]; t < qo_p[b + 1]; ++t) request_of[t] = b;
  auto out = torch::zeros({total_q, hq, d}, q.options());
  const float *qs = q.data_ptr<float>(), *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t q0 = q.stride(0), q1 = q.stride(1), k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0),
                v1 = v.stride(1);
  const float sc = static_cast<float>(scale);
  const __m512 scale16 = _mm512_set1_ps(sc);
  at::parallel_for(0, total_q * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    std::vector<const float*> keys;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / hkv, h = item % hkv, b = request_of[t];
      const int64_t i = t - qo_p[b], q_len = qo_p[b + 1] - qo_p[b], first = kv_p[b], kv_len = kv_p[b + 1] - first;
      rows.clear();
      if (causal) {
        for (int64_t j = 0; j <= kv_len - q_len + i; ++j) rows.push_back(idx_p[first + j]);
      } else {
        const bool* sees = mask_p + mask_off[b] + i * kv_len;
        for (int64_t j = 0; j < kv_len; ++j)
          if (sees[j]) rows.push_back(idx_p[first + j]);
      }
      const int64_t n = static_cast<int64_t>(rows.size());
      if (n == 0) continue;  // a row that sees no key: zeros
      scores.resize(group * n);
      keys.resize(n);
      for (int64_t j = 0; j < n; ++j) keys[j] = ks + rows[j] * k0 + h * k1;
      for (int64_t g = 0; g < group; ++g) {  // whole blocks of 16 keys, then one by one: fixed by n, the row's own
        const float* query = qs + t * q0 + (h * group + g) * q1;
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes)
          _mm512_storeu_ps(scores.data() + g * n + j, _mm512_mul_ps(dots16(query, keys.data() + j, d), scale16));
        for (; j < n; ++j) scores[g * n + j] = dot(query, keys[j], d) * sc;
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* p = scores.data() + g * n;
        const __m512 inv = _mm512_set1_ps(1.0f / softmax_numerators(scores.data() + g * n, n));
        float* o = os + (t * hq + h * group + g) * d;
        for (int64_t c = 0; c < d; c += kLanes) {  // 16 dims at a time; four running sums (key j to sum j % 4)
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t j = 0; j < n; ++j)
            acc[j % 4] = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(vs + rows[j] * v0 + h * v1 + c),
                                         acc[j % 4]);
          const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
          _mm512_storeu_ps(o + c, _mm512_mul_ps(sum, inv));
        }
      }
    }
  });
  return out;
}

}  // namespace whiflash
