// The Python module of the CPU kernels: the batch-invariant GEMMs (invariant_gemm.cpp) and paged tree attention
// (paged_attention.cpp, and with bf16 products on AMX: paged_attention_bf16.cpp).

#include <torch/extension.h>

#include "gemm_panels.h"  // pack()

namespace whiflash {
torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& panels, int64_t n);
bool amx_permitted();
bool bf16_dot_runs();
torch::Tensor pack_bf16(const torch::Tensor& weight);
torch::Tensor linear_bf16(const torch::Tensor& input, const torch::Tensor& panels, int64_t n);
std::vector<torch::Tensor> visible_keys(const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                                        const torch::Tensor& mask, const torch::Tensor& mask_indptr);
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                              const torch::Tensor& kv_indices, const torch::Tensor& lead,
                              const torch::Tensor& own_indptr, const torch::Tensor& own, double scale);
torch::Tensor paged_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& qo_indptr, const torch::Tensor& kv_indptr,
                                   const torch::Tensor& kv_indices, const torch::Tensor& lead,
                                   const torch::Tensor& own_indptr, const torch::Tensor& own, double scale);
}  // namespace whiflash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &whiflash::pack, "float32 [N, K] weight -> [ceil(N/16), K, 16] panels");
  m.def("linear", &whiflash::linear, "rows [M, K] . W^T with W packed, batch-invariant");
  m.def("amx_permitted", &whiflash::amx_permitted, "whether the OS gave this process AMX state");
  m.def("pack_bf16", &whiflash::pack_bf16, "[N, K] weight -> bf16 AMX B-tile panels");
  m.def("bf16_dot_runs", &whiflash::bf16_dot_runs, "whether this CPU has AVX512-BF16 (linear_bf16 without AMX)");
  m.def("linear_bf16", &whiflash::linear_bf16, "rows [M, K] . W^T in bf16 products (AMX or AVX512-BF16), float32 sums");
  m.def("visible_keys", &whiflash::visible_keys, "per query row: leading keys seen, then its other keys (CSR)");
  m.def("paged_attention", &whiflash::paged_attention, "float32 tree attention over a paged KV pool, per row");
  m.def("paged_attention_bf16", &whiflash::paged_attention_bf16, "the same in bf16 products on AMX, float32 sums");
}
