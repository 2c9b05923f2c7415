// The hawada._C module: batched slicing and latency loops.
#include <torch/extension.h>
#include <torch/script.h>

#include <optional>
#include <vector>

#ifndef HAWADA_SRC_HASH
#define HAWADA_SRC_HASH "unknown"
#endif
#ifndef HAWADA_TORCH_VERSION
#define HAWADA_TORCH_VERSION "unknown"
#endif

namespace hawada {
void slice_many(const std::vector<at::Tensor>& srcs, const std::vector<std::optional<at::Tensor>>& rows,
                const std::vector<std::optional<at::Tensor>>& cols, const std::vector<at::Tensor>& dsts);
std::vector<double> time_script_cpu(const torch::jit::Module& module, const std::vector<at::Tensor>& inputs,
                                    int64_t repeats, int64_t warmup);
bool has_cuda();
#ifdef WITH_CUDA
std::vector<double> time_cuda_graph(pybind11::object graph, int64_t repeats, int64_t flush_bytes);
#endif
}  // namespace hawada

// Bumped whenever the Python side needs a different set of functions.
constexpr int kAbiVersion = 1;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "HawAda C++/CUDA extension: batched weight slicing and low-overhead latency timing";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("SOURCE_HASH") = HAWADA_SRC_HASH;
  m.attr("TORCH_VERSION") = HAWADA_TORCH_VERSION;
  m.def("has_cuda", &hawada::has_cuda, "True when built with the CUDA sources");
  m.def("slice_many", &hawada::slice_many, "Fill dsts[i] with srcs[i][rows[i]][:, cols[i]]",
        py::arg("srcs"), py::arg("rows"), py::arg("cols"), py::arg("dsts"));
  m.def(
      "time_script_cpu",
      [](py::object module, const std::vector<at::Tensor>& inputs, int64_t repeats, int64_t warmup) {
        // Accept a torch.jit.ScriptModule (its C++ handle is `_c`) or the handle itself.
        py::object handle = py::hasattr(module, "_c") ? module.attr("_c") : module;
        return hawada::time_script_cpu(handle.cast<torch::jit::Module>(), inputs, repeats, warmup);
      },
      "Milliseconds per forward of a TorchScript module, timed in C++ with the GIL released",
      py::arg("module"), py::arg("inputs"), py::arg("repeats"), py::arg("warmup") = 0);
#ifdef WITH_CUDA
  m.def("time_cuda_graph", &hawada::time_cuda_graph,
        "Milliseconds per replay of a captured torch.cuda.CUDAGraph (event pair per replay)",
        py::arg("graph"), py::arg("repeats"), py::arg("flush_bytes") = 0);
#endif
}
