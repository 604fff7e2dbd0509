// y = x @ W^T for a 2:4 weight W (N, K) on sparse tensor cores, through cuSPARSELt with plans that live.
//
// PyTorch's _cslt_sparse_mm builds descriptors and a matmul plan on every call (about 0.8 ms on an H200,
// whatever the size). Here a Plan is built once per (weight shape, dtype, M) and reused: a call is one
// cusparseLtMatmul on the current stream, so it also records into CUDA graphs. The layouts mirror a
// row-major linear: A = W row-major (N x K, 2:4 along K), B = x row-major (M x K) read transposed, and
// D column-major (N x M), which is y (M x N) row-major, so no transpose is ever materialised.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparseLt.h>
#include <torch/extension.h>

#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace {

#define SINK_CHECK(call)                                                                          \
  do {                                                                                            \
    cusparseStatus_t status_ = (call);                                                            \
    TORCH_CHECK(status_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt: ", #call, " failed: ",            \
                cusparseLtGetErrorString(status_), " (", static_cast<int>(status_), ")");        \
  } while (0)

constexpr uint32_t kAlignment = 16;

// One library handle per process (cusparseLtInit is costly; the handle is thread-safe for matmuls).
const cusparseLtHandle_t* handle() {
  static cusparseLtHandle_t h;
  static std::once_flag once;
  std::call_once(once, [] { SINK_CHECK(cusparseLtInit(&h)); });
  return &h;
}

cudaDataType data_type(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "cuSPARSELt linear takes float16 or bfloat16, not ",
              dtype);
  return dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

at::ScalarType scalar_type(const std::string& name) {
  TORCH_CHECK(name == "float16" || name == "bfloat16", "cuSPARSELt linear takes float16 or bfloat16, not ", name);
  return name == "float16" ? at::kHalf : at::kBFloat16;
}

// The structured (weight) descriptor alone: what compression needs.
struct WeightDescriptor {
  cusparseLtMatDescriptor_t desc;
  WeightDescriptor(int64_t n, int64_t k, cudaDataType type) {
    SINK_CHECK(cusparseLtStructuredDescriptorInit(handle(), &desc, n, k, k, kAlignment, type, CUSPARSE_ORDER_ROW,
                                                  CUSPARSELT_SPARSITY_50_PERCENT));
  }
  ~WeightDescriptor() { cusparseLtMatDescriptorDestroy(&desc); }
};

}  // namespace

// Compress a dense 2:4 weight (N, K) into cuSPARSELt's opaque layout (values and metadata), once, at load.
torch::Tensor compress(const torch::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda() && weight.dim() == 2 && weight.is_contiguous(),
              "compress: expected a contiguous 2-D CUDA weight");
  c10::cuda::CUDAGuard guard(weight.device());
  WeightDescriptor a(weight.size(0), weight.size(1), data_type(weight.scalar_type()));
  size_t compressed_size = 0, buffer_size = 0;
  SINK_CHECK(cusparseLtSpMMACompressedSize2(handle(), &a.desc, &compressed_size, &buffer_size));
  auto bytes = weight.options().dtype(at::kByte);
  auto compressed = torch::empty({static_cast<int64_t>(compressed_size)}, bytes);
  auto buffer = torch::empty({static_cast<int64_t>(std::max<size_t>(buffer_size, 1))}, bytes);
  SINK_CHECK(cusparseLtSpMMACompress2(handle(), &a.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, weight.data_ptr(),
                                      compressed.data_ptr(), buffer.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return compressed;
}

// A matmul plan for one (N, K, M, dtype): descriptors, algorithm and workspace, made once.
class Plan {
 public:
  Plan(int64_t n, int64_t k, int64_t m, const std::string& dtype, int64_t alg_id, int64_t device)
      : n_(n), k_(k), m_(m), dtype_(scalar_type(dtype)) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaDataType type = data_type(dtype_);
    SINK_CHECK(cusparseLtStructuredDescriptorInit(handle(), &a_, n, k, k, kAlignment, type, CUSPARSE_ORDER_ROW,
                                                  CUSPARSELT_SPARSITY_50_PERCENT));
    SINK_CHECK(cusparseLtDenseDescriptorInit(handle(), &b_, m, k, k, kAlignment, type, CUSPARSE_ORDER_ROW));
    SINK_CHECK(cusparseLtDenseDescriptorInit(handle(), &d_, n, m, n, kAlignment, type, CUSPARSE_ORDER_COL));
    SINK_CHECK(cusparseLtMatmulDescriptorInit(handle(), &matmul_, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                              CUSPARSE_OPERATION_TRANSPOSE, &a_, &b_, &d_, &d_,
                                              CUSPARSE_COMPUTE_32F));
    SINK_CHECK(cusparseLtMatmulAlgSelectionInit(handle(), &selection_, &matmul_, CUSPARSELT_MATMUL_ALG_DEFAULT));
    int32_t max_id = 0;
    SINK_CHECK(cusparseLtMatmulAlgGetAttribute(handle(), &selection_, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id,
                                               sizeof(max_id)));
    TORCH_CHECK(alg_id >= 0 && alg_id <= max_id, "cuSPARSELt algorithm id ", alg_id, " is outside 0..", max_id);
    max_alg_id_ = max_id;
    int32_t id = static_cast<int32_t>(alg_id);
    SINK_CHECK(cusparseLtMatmulAlgSetAttribute(handle(), &selection_, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id,
                                               sizeof(id)));
    init_plan();
    auto bytes = torch::TensorOptions().dtype(at::kByte).device(torch::kCUDA, device);
    workspace_ = torch::empty({static_cast<int64_t>(std::max<size_t>(workspace_size_, 1))}, bytes);
  }

  ~Plan() {
    cusparseLtMatmulPlanDestroy(&plan_);
    cusparseLtMatmulAlgSelectionDestroy(&selection_);
    cusparseLtMatDescriptorDestroy(&a_);
    cusparseLtMatDescriptorDestroy(&b_);
    cusparseLtMatDescriptorDestroy(&d_);
  }

  // out (M, N) = x (M, K) @ W^T; x and out contiguous, M equal to the plan's.
  void run(const torch::Tensor& compressed, const torch::Tensor& x, torch::Tensor& out) {
    check(compressed, x, out);
    float alpha = 1.0f, beta = 0.0f;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    SINK_CHECK(cusparseLtMatmul(handle(), &plan_, &alpha, compressed.data_ptr(), x.data_ptr(), &beta,
                                out.data_ptr(), out.data_ptr(), workspace_.data_ptr(), &stream, 1));
  }

  // The weight compressed through this plan (cusparseLtSpMMACompress): the library's layout for this
  // algorithm, which `compress()` (from the weight's descriptor alone) may not match for every algorithm.
  torch::Tensor compress_for_plan(const torch::Tensor& weight) {
    TORCH_CHECK(weight.is_cuda() && weight.is_contiguous() && weight.scalar_type() == dtype_ &&
                    weight.size(0) == n_ && weight.size(1) == k_,
                "compress_for_plan: expected a contiguous (", n_, ", ", k_, ") ", dtype_, " CUDA weight");
    size_t compressed_size = 0, buffer_size = 0;
    SINK_CHECK(cusparseLtSpMMACompressedSize(handle(), &plan_, &compressed_size, &buffer_size));
    auto bytes = weight.options().dtype(at::kByte);
    auto compressed = torch::empty({static_cast<int64_t>(compressed_size)}, bytes);
    auto buffer = torch::empty({static_cast<int64_t>(std::max<size_t>(buffer_size, 1))}, bytes);
    SINK_CHECK(cusparseLtSpMMACompress(handle(), &plan_, weight.data_ptr(), compressed.data_ptr(), buffer.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream()));
    return compressed;
  }

  // cuSPARSELt's own search over algorithms (and split-K) with a workspace of `workspace_bytes` (the search
  // may try algorithms that need more than the default one's); the plan is rebuilt around its choice.
  // Returns (algorithm id, split-K).
  std::tuple<int64_t, int64_t> search(const torch::Tensor& compressed, const torch::Tensor& x, torch::Tensor& out,
                                      int64_t workspace_bytes) {
    check(compressed, x, out);
    auto workspace = torch::empty({std::max<int64_t>(workspace_bytes, 1)}, workspace_.options());
    float alpha = 1.0f, beta = 0.0f;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    SINK_CHECK(cusparseLtMatmulSearch(handle(), &plan_, &alpha, compressed.data_ptr(), x.data_ptr(), &beta,
                                      out.data_ptr(), out.data_ptr(), workspace.data_ptr(), &stream, 1));
    int32_t id = 0, split_k = 0;
    SINK_CHECK(cusparseLtMatmulAlgGetAttribute(handle(), &selection_, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id,
                                               sizeof(id)));
    SINK_CHECK(cusparseLtMatmulAlgGetAttribute(handle(), &selection_, CUSPARSELT_MATMUL_SPLIT_K, &split_k,
                                               sizeof(split_k)));
    cusparseLtMatmulPlanDestroy(&plan_);
    init_plan();
    if (workspace_.numel() < static_cast<int64_t>(workspace_size_)) {
      workspace_ = torch::empty({static_cast<int64_t>(workspace_size_)}, workspace_.options());
    }
    return {id, split_k};
  }

  int64_t workspace_bytes() const { return static_cast<int64_t>(workspace_size_); }
  int64_t max_alg_id() const { return max_alg_id_; }

 private:
  void init_plan() {
    SINK_CHECK(cusparseLtMatmulPlanInit(handle(), &plan_, &matmul_, &selection_));
    SINK_CHECK(cusparseLtMatmulGetWorkspace(handle(), &plan_, &workspace_size_));
  }

  void check(const torch::Tensor& compressed, const torch::Tensor& x, const torch::Tensor& out) const {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == dtype_ && x.dim() == 2 &&
                    x.size(0) == m_ && x.size(1) == k_,
                "cuSPARSELt plan (M=", m_, ", K=", k_, ", ", dtype_, "): x must be a contiguous CUDA tensor of that "
                "shape and dtype, got ", x.sizes(), " ", x.scalar_type());
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == dtype_ && out.size(0) == m_ && out.size(1) == n_,
                "cuSPARSELt plan: out must be contiguous (", m_, ", ", n_, ") ", dtype_);
    TORCH_CHECK(compressed.is_cuda() && compressed.scalar_type() == at::kByte,
                "cuSPARSELt plan: the weight must be the uint8 tensor compress() returned");
  }

  int64_t n_, k_, m_;
  at::ScalarType dtype_;
  size_t workspace_size_ = 0;
  int64_t max_alg_id_ = 0;
  cusparseLtMatDescriptor_t a_, b_, d_;
  cusparseLtMatmulDescriptor_t matmul_;
  cusparseLtMatmulAlgSelection_t selection_;
  cusparseLtMatmulPlan_t plan_;
  torch::Tensor workspace_;
};

std::string version() {
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("compress", &compress, "Compress a dense 2:4 weight (N, K) for cuSPARSELt");
  module.def("version", &version, "The cuSPARSELt library version in use");
  pybind11::class_<Plan, std::shared_ptr<Plan>>(module, "Plan")
      .def(pybind11::init<int64_t, int64_t, int64_t, const std::string&, int64_t, int64_t>(), pybind11::arg("n"),
           pybind11::arg("k"), pybind11::arg("m"), pybind11::arg("dtype"), pybind11::arg("alg_id") = 0,
           pybind11::arg("device") = 0)
      .def("run", &Plan::run)
      .def("compress_for_plan", &Plan::compress_for_plan)
      .def("search", &Plan::search)
      .def_property_readonly("max_alg_id", &Plan::max_alg_id)
      .def_property_readonly("workspace_bytes", &Plan::workspace_bytes);
}
