// Latency loops that keep Python out of the measured region.
//
// CPU: a TorchScript module (traced or scripted in Python) called N times from C++ with the
// GIL released, timed with std::chrono::steady_clock. The graph executor's optimisations are
// switched off so that the loop runs the same ATen ops as the eager model, without Python.
// CUDA: a captured CUDA graph replayed N times, one event pair per replay, optionally with an
// L2 flush (a memset of a buffer larger than L2) before each replay, outside the event pair.
#include <torch/extension.h>
#include <torch/script.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <chrono>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace hawada {

// Milliseconds per call of module.forward(*inputs); `warmup` untimed calls first.
std::vector<double> time_script_cpu(const torch::jit::Module& module, const std::vector<at::Tensor>& inputs,
                                    int64_t repeats, int64_t warmup) {
  TORCH_CHECK_VALUE(repeats >= 1, "time_script_cpu: repeats must be >= 1, got ", repeats);
  TORCH_CHECK_VALUE(warmup >= 0, "time_script_cpu: warmup must be >= 0, got ", warmup);
  for (const auto& t : inputs)
    TORCH_CHECK_VALUE(t.device().is_cpu(), "time_script_cpu: inputs must be CPU tensors, got ", t.device());
  std::vector<c10::IValue> args(inputs.begin(), inputs.end());
  std::vector<double> samples(static_cast<size_t>(repeats));
  torch::jit::Module m = module;  // shallow handle; forward is const-safe
  {
    py::gil_scoped_release no_gil;
    c10::InferenceMode inference;
    torch::jit::GraphOptimizerEnabledGuard no_opt(false);
    for (int64_t i = 0; i < warmup; ++i) m.forward(args);
    for (int64_t i = 0; i < repeats; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      c10::IValue out = m.forward(args);
      const auto t1 = std::chrono::steady_clock::now();
      samples[i] = std::chrono::duration<double, std::milli>(t1 - t0).count();
      (void)out;  // released after the timed region
    }
  }
  return samples;
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef WITH_CUDA
namespace {
void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "time_cuda_graph: ", what, ": ", cudaGetErrorString(err));
}

// Owns the events of one timing loop: every created event is destroyed when the loop leaves,
// also when a failed check or a failed replay throws half-way. Events are created after the
// object is complete (create_all), so its destructor runs even when a creation fails; slots
// not yet created hold nullptr.
class EventSet {
 public:
  explicit EventSet(size_t n) : ev_(n, nullptr) {}
  ~EventSet() {
    for (cudaEvent_t e : ev_)
      if (e != nullptr) cudaEventDestroy(e);  // an event still queued is released once reached
  }
  EventSet(const EventSet&) = delete;
  EventSet& operator=(const EventSet&) = delete;

  void create_all() {
    for (auto& e : ev_) cuda_check(cudaEventCreate(&e), "cudaEventCreate");
  }
  cudaEvent_t operator[](size_t i) const { return ev_[i]; }
  cudaEvent_t back() const { return ev_.back(); }

 private:
  std::vector<cudaEvent_t> ev_;
};
}  // namespace

// Milliseconds per replay of `graph` (a torch.cuda.CUDAGraph). Every replay is enqueued
// back to back on the current stream; the host waits once, after the last one.
std::vector<double> time_cuda_graph(py::object graph, int64_t repeats, int64_t flush_bytes) {
  TORCH_CHECK_VALUE(repeats >= 1, "time_cuda_graph: repeats must be >= 1, got ", repeats);
  TORCH_CHECK_VALUE(flush_bytes >= 0, "time_cuda_graph: flush_bytes must be >= 0, got ", flush_bytes);
  at::cuda::CUDAGraph& g = graph.cast<at::cuda::CUDAGraph&>();
  at::Tensor flush;
  if (flush_bytes > 0)
    flush = at::empty({flush_bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  std::vector<double> samples(static_cast<size_t>(repeats));
  {
    py::gil_scoped_release no_gil;
    EventSet ev(2 * static_cast<size_t>(repeats));  // destroyed before the GIL is taken back
    ev.create_all();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t i = 0; i < repeats; ++i) {
      if (flush_bytes > 0)
        cuda_check(cudaMemsetAsync(flush.data_ptr(), static_cast<int>(i & 0xff), flush_bytes, stream),
                   "cudaMemsetAsync");
      cuda_check(cudaEventRecord(ev[2 * i], stream), "cudaEventRecord");
      g.replay();
      cuda_check(cudaEventRecord(ev[2 * i + 1], stream), "cudaEventRecord");
    }
    cuda_check(cudaEventSynchronize(ev.back()), "cudaEventSynchronize");
    for (int64_t i = 0; i < repeats; ++i) {
      float ms = 0.f;
      cuda_check(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
      samples[i] = ms;
    }
  }
  return samples;
}
#endif

}  // namespace hawada
