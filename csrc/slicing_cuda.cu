// slice_many on CUDA: one launch over a flattened work list of (job, row range) blocks.
#include "slicing.h"

// Light CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a bare
// CUDA toolkit may lack (torch ships them in separate wheels).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstring>

namespace hawada {
namespace {

struct alignas(16) Bytes16 {
  uint64_t a, b;
};

template <typename T>
__device__ __forceinline__ void copy_elems(const SliceJob& job, const int64_t* rows, const int64_t* cols,
                                           int64_t row0, int64_t row1) {
  const int64_t per_row = job.n_cols * job.inner;
  const T* src = reinterpret_cast<const T*>(job.src);
  T* dst = reinterpret_cast<T*>(job.dst);
  for (int64_t i = row0; i < row1; ++i) {
    const int64_t r = rows ? rows[i] : i;
    const T* base = src + r * job.s0;
    T* out = dst + i * per_row;
    for (int64_t e = threadIdx.x; e < per_row; e += blockDim.x) {
      const int64_t j = e / job.inner;
      const int64_t k = e - j * job.inner;
      const int64_t c = cols ? cols[j] : j;
      out[e] = base[c * job.s1 + k * job.s2];
    }
  }
}

__global__ void slice_many_kernel(const SliceJob* jobs, const SliceBlock* blocks, const int64_t* index) {
  const SliceBlock blk = blocks[blockIdx.x];
  const SliceJob job = jobs[blk.job];
  // Offsets into the index buffer were stored +1, 0 meaning identity.
  const int64_t ro = reinterpret_cast<int64_t>(job.rows);
  const int64_t co = reinterpret_cast<int64_t>(job.cols);
  const int64_t* rows = ro ? index + (ro - 1) : nullptr;
  const int64_t* cols = co ? index + (co - 1) : nullptr;
  switch (job.esize) {
    case 1: copy_elems<uint8_t>(job, rows, cols, blk.row0, blk.row1); break;
    case 2: copy_elems<uint16_t>(job, rows, cols, blk.row0, blk.row1); break;
    case 4: copy_elems<uint32_t>(job, rows, cols, blk.row0, blk.row1); break;
    case 8: copy_elems<uint64_t>(job, rows, cols, blk.row0, blk.row1); break;
    case 16: copy_elems<Bytes16>(job, rows, cols, blk.row0, blk.row1); break;
    default: break;  // rejected on the host before launch
  }
}

}  // namespace

void slice_many_cuda(const std::vector<SliceJob>& jobs, const std::vector<SliceBlock>& blocks,
                     const std::vector<int64_t>& host_index, const at::Device& device) {
  for (const SliceJob& j : jobs) {
    TORCH_CHECK_VALUE(j.esize == 1 || j.esize == 2 || j.esize == 4 || j.esize == 8 || j.esize == 16,
                      "slice_many: element size ", j.esize, " is not supported on CUDA");
  }
  TORCH_CHECK_VALUE(blocks.size() < (1u << 31), "slice_many: too many work blocks (", blocks.size(), ")");
  c10::cuda::CUDAGuard guard(device);
  // One host->device transfer: [jobs][blocks][index], 8-byte aligned throughout.
  const size_t jb = jobs.size() * sizeof(SliceJob);
  const size_t bb = blocks.size() * sizeof(SliceBlock);
  const size_t ib = std::max<size_t>(1, host_index.size()) * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(jb + bb + ib)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memcpy(h, jobs.data(), jb);
  std::memcpy(h + jb, blocks.data(), bb);
  if (!host_index.empty()) std::memcpy(h + jb + bb, host_index.data(), host_index.size() * sizeof(int64_t));
  // non_blocking from pinned memory: the caching host allocator keeps `host` alive until the
  // copy on the current stream has finished.
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const uint8_t* d = dev.const_data_ptr<uint8_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  slice_many_kernel<<<static_cast<unsigned>(blocks.size()), 256, 0, stream>>>(
      reinterpret_cast<const SliceJob*>(d), reinterpret_cast<const SliceBlock*>(d + jb),
      reinterpret_cast<const int64_t*>(d + jb + bb));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hawada
