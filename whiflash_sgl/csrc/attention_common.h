// What the two paged tree-attention kernels (float32: paged_attention.cpp; bf16 products on AMX:
// paged_attention_bf16.cpp) share: e^x, the work items (blocks of one request's query rows, with their KV heads),
// the keys a block's rows all see and each row's further keys.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

namespace whiflash {

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

inline __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// asks for the d floats at each of rows[0 .. count) to be brought into cache: keys and values live in pool rows
// scattered over tens of megabytes per layer, so a pass over them waits on memory unless it asks ahead
inline void prefetch_rows(const float* const* rows, int64_t count, int64_t d) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t c = 0; c < d; c += kLanes) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c), _MM_HINT_T0);
}

// the pointers to `count` keys' (or values') head vectors: out[j] is pool row idx[j] of `base`
inline void head_rows(const float* base, int64_t stride0, const int64_t* idx, int64_t count,
                      std::vector<const float*>& out) {
  out.resize(count);
  for (int64_t j = 0; j < count; ++j) out[j] = base + idx[j] * stride0;
}

// The ragged batch's layout and which keys each row sees (visible_keys), as raw pointers.
struct Rows {
  const int64_t *qo, *kv, *idx, *lead, *own_indptr, *own;
};

// The plan's tensors, kept contiguous and alive for the call, and their pointers.
struct Plan {
  torch::Tensor qo_t, kv_t, idx_t, lead_t, own_indptr_t, own_t;
  Rows rows;
  int64_t batch;

  Plan(const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
       const torch::Tensor& lead, const torch::Tensor& own_indptr, const torch::Tensor& own)
      : qo_t(qo_indptr.contiguous()), kv_t(kv_indptr.contiguous()), idx_t(kv_indices.contiguous()),
        lead_t(lead.contiguous()), own_indptr_t(own_indptr.contiguous()), own_t(own.contiguous()),
        rows{qo_t.data_ptr<int64_t>(), kv_t.data_ptr<int64_t>(), idx_t.data_ptr<int64_t>(),
             lead_t.data_ptr<int64_t>(), own_indptr_t.data_ptr<int64_t>(), own_t.data_ptr<int64_t>()},
        batch(qo_t.numel() - 1) {}
};

// q [rows, Hq, D], k and v [pool rows, Hkv, D], float32, head dim dense and a multiple of 16; a plan for q's rows.
// Returns q's rows.
inline int64_t checked_rows(const char* name, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& lead, const torch::Tensor& own_indptr) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, name, ": expected [rows, heads, dim] q, k, v");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              name, ": float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, name, ": head dim must be dense");
  TORCH_CHECK(q.size(2) % kLanes == 0 && q.size(1) % k.size(1) == 0 && v.size(2) == q.size(2) &&
                  k.size(2) == q.size(2),
              name, ": head dim a multiple of 16, query heads a multiple of KV heads");
  TORCH_CHECK(lead.numel() == q.size(0) && own_indptr.numel() == q.size(0) + 1, name, ": a plan for other rows");
  return q.size(0);
}

// One request's query rows [begin, end) (indices within the request).
struct Block {
  int64_t request, begin, end;
};

// The work items: blocks of 4 to 64 rows of one request (as many as keep every thread busy: a tree's rows share all
// their context's loads), largest first, each with every KV head (they share the pool rows' cache lines), or with
// one where there are too few blocks for the threads. Item i is block blocks[i * heads / hkv] with heads
// [i * heads % hkv, + heads).
struct WorkItems {
  std::vector<Block> blocks;
  int64_t heads = 1, count = 0;

  WorkItems(const Rows& rows, int64_t batch, int64_t hkv) {
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, rows.qo[b + 1] - rows.qo[b]);
    const int64_t threads = at::get_num_threads();
    const int64_t per_request = std::max<int64_t>(1, (4 * threads + batch - 1) / std::max<int64_t>(batch, 1));
    const int64_t step = std::clamp<int64_t>((longest + per_request - 1) / per_request, 4, 64);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < rows.qo[b + 1] - rows.qo[b]; i += step)
        blocks.push_back({b, i, std::min(i + step, rows.qo[b + 1] - rows.qo[b])});
    // the threads take the largest blocks first, one at a time (a prefill chunk's blocks beside a batch's trees
    // would leave one thread all the work if each took a fixed share of the list)
    const auto work = [&](const Block& x) { return (x.end - x.begin) * (rows.kv[x.request + 1] - rows.kv[x.request]); };
    std::stable_sort(blocks.begin(), blocks.end(), [&](const Block& x, const Block& y) { return work(x) > work(y); });
    const int64_t n = static_cast<int64_t>(blocks.size());
    heads = n >= 2 * threads ? hkv : 1;
    count = n * (hkv / heads);
  }
};

// A block's keys: the `shared` leading keys every row of it sees (rounded down to a multiple of `align`, so that a
// key's place in every aligned group is its place in each row's own list), then each row's further keys (those up
// to its lead, then its own beyond it: a tree row's ancestors) as pool rows, flat, row r's at rest[rest_at[r] ..).
struct BlockKeys {
  int64_t shared = 0, widest = 0;  // widest: the most keys any row sees
  std::vector<int64_t> rest, rest_at;

  void gather(const Rows& rows, const Block& block, int64_t align) {
    const int64_t first = rows.kv[block.request], row0 = rows.qo[block.request] + block.begin;
    const int64_t n = block.end - block.begin;
    shared = rows.kv[block.request + 1] - first;
    for (int64_t r = 0; r < n; ++r) shared = std::min(shared, rows.lead[row0 + r]);
    shared -= shared % align;
    rest.clear();
    rest_at.assign(1, 0);
    widest = shared;
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = shared; j < rows.lead[row0 + r]; ++j) rest.push_back(rows.idx[first + j]);
      for (int64_t j = rows.own_indptr[row0 + r]; j < rows.own_indptr[row0 + r + 1]; ++j)
        rest.push_back(rows.idx[first + rows.own[j]]);
      rest_at.push_back(static_cast<int64_t>(rest.size()));
      widest = std::max(widest, count(r));
    }
  }

  int64_t further(int64_t r) const { return rest_at[r + 1] - rest_at[r]; }
  int64_t count(int64_t r) const { return shared + further(r); }
};

// One kernel call: the checked inputs as raw pointers with their row and head strides, the plan, the work items and
// the output (not zeroed: every row of every request is in a work item, which writes all its heads).
struct Call {
  const int64_t total_q, hq, d, hkv, group;
  const Plan plan;
  const WorkItems items;
  torch::Tensor out;
  const float *qs, *ks, *vs;
  float* os;
  const int64_t q0, q1, k0, k1, v0, v1;

  Call(const char* name, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
       const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
       const torch::Tensor& lead, const torch::Tensor& own_indptr, const torch::Tensor& own)
      : total_q(checked_rows(name, q, k, v, lead, own_indptr)), hq(q.size(1)), d(q.size(2)),
        hkv(k.size(1)), group(hq / hkv), plan(qo_indptr, kv_indptr, kv_indices, lead, own_indptr, own),
        items(plan.rows, plan.batch, hkv), out(torch::empty({total_q, hq, d}, q.options())),
        qs(q.data_ptr<float>()), ks(k.data_ptr<float>()), vs(v.data_ptr<float>()), os(out.data_ptr<float>()),
        q0(q.stride(0)), q1(q.stride(1)), k0(k.stride(0)), k1(k.stride(1)), v0(v.stride(0)), v1(v.stride(1)) {}

  // Each thread runs `body(next)` once, with its own state; next() hands out the work items one at a time, the
  // largest first, to whichever thread is free, and a number past the last when none is left.
  template <typename Body>
  void run(Body&& body) const {
    std::atomic<int64_t> counter{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items.count), 1,
                     [&](int64_t, int64_t) { body([&counter] { return counter++; }); });
  }

  const float* query(int64_t row, int64_t head) const { return qs + row * q0 + head * q1; }
  float* output(int64_t row, int64_t head) const { return os + (row * hq + head) * d; }
};

// Work item `index` of a call: its block's rows and queries (rows x the query heads per KV head), where they start,
// and its KV heads; the block's keys gathered into `seen`, aligned to `align`.
struct Item {
  int64_t rows, n_q, first, row0, first_head, heads;

  Item(const Call& call, int64_t index, BlockKeys& seen, int64_t align) {
    const WorkItems& items = call.items;
    const Block& span = items.blocks[index * items.heads / call.hkv];
    seen.gather(call.plan.rows, span, align);
    rows = span.end - span.begin, n_q = rows * call.group, first = call.plan.rows.kv[span.request];
    row0 = call.plan.rows.qo[span.request] + span.begin;
    first_head = index * items.heads % call.hkv, heads = items.heads;
  }
};

// One KV head's key and value vectors for an item: those every row sees, then each row's further ones (`seen`'s).
struct HeadRows {
  std::vector<const float*> shared_k, shared_v, rest_k, rest_v;

  void point(const Call& call, const Item& item, const BlockKeys& seen, int64_t h) {
    const int64_t* idx = call.plan.rows.idx + item.first;
    head_rows(call.ks + h * call.k1, call.k0, idx, seen.shared, shared_k);
    head_rows(call.vs + h * call.v1, call.v0, idx, seen.shared, shared_v);
    head_rows(call.ks + h * call.k1, call.k0, seen.rest.data(), seen.rest.size(), rest_k);
    head_rows(call.vs + h * call.v1, call.v0, seen.rest.data(), seen.rest.size(), rest_v);
  }
};

}  // namespace whiflash
