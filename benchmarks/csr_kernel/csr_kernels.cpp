// CSR kernels for synthprune's csr layer, batch-minor layout: activations are [n, B] row-major
// (the transposed view the layer passes around), so every connection touches B contiguous values.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

template <typename scalar_t>
void spmm_rows(const int32_t* crow, const int32_t* col, const scalar_t* values, const int64_t* perm,
               const scalar_t* x, const scalar_t* bias, scalar_t* y, int64_t n_rows, int64_t batch) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* out = y + i * batch;
      const scalar_t b = bias ? bias[i] : scalar_t(0);
      for (int64_t t = 0; t < batch; ++t) out[t] = b;
      for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
        const scalar_t v = values[perm ? perm[k] : k];
        const scalar_t* in = x + static_cast<int64_t>(col[k]) * batch;
#pragma omp simd
        for (int64_t t = 0; t < batch; ++t) out[t] += v * in[t];
      }
    }
  });
}

template <typename scalar_t>
void sddmm_rows(const int32_t* crow, const int32_t* col, const scalar_t* grad, const scalar_t* x,
                scalar_t* out, int64_t n_rows, int64_t batch) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* g = grad + i * batch;
      for (int64_t k = crow[i]; k < crow[i + 1]; ++k) {
        const scalar_t* in = x + static_cast<int64_t>(col[k]) * batch;
        scalar_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < batch; ++t) s += g[t] * in[t];
        out[k] = s;
      }
    }
  });
}

}  // namespace

// y_t [n_rows, B] = W x_t (+ bias), W in CSR (crow, col, values[perm[k]] when perm is given).
torch::Tensor spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor values, c10::optional<torch::Tensor> perm,
                   torch::Tensor x_t, c10::optional<torch::Tensor> bias) {
  const int64_t n_rows = crow.size(0) - 1, batch = x_t.size(1);
  auto y = torch::empty({n_rows, batch}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "spmm", [&] {
    spmm_rows<scalar_t>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(),
                        perm ? perm->data_ptr<int64_t>() : nullptr, x_t.data_ptr<scalar_t>(),
                        bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), n_rows, batch);
  });
  return y;
}

// out[k] = <grad_t[row(k)], x_t[col(k)]>: the value gradient at the connections only.
torch::Tensor sddmm(torch::Tensor crow, torch::Tensor col, torch::Tensor grad_t, torch::Tensor x_t) {
  const int64_t n_rows = crow.size(0) - 1, batch = x_t.size(1);
  auto out = torch::empty({col.size(0)}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "sddmm", [&] {
    sddmm_rows<scalar_t>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), grad_t.data_ptr<scalar_t>(),
                         x_t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n_rows, batch);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spmm", &spmm, "CSR x dense, batch-minor");
  m.def("sddmm", &sddmm, "sampled dense-dense product at the CSR pattern");
}
