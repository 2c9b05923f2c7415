// slice_many: CPU implementation, argument checks shared with the CUDA path.
#include "slicing.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>

namespace hawada {
namespace {

// Output bytes per parallel block: large enough to amortise scheduling, small enough to
// spread a few big tensors over every thread.
constexpr int64_t kBlockBytes = 256 * 1024;

std::string where(size_t i, const char* what) {
  return "slice_many: tensor " + std::to_string(i) + " " + what;
}

// Index tensor -> int64 values on the CPU (checked: dtype, 1-D, range), appended to `buf`.
// Returns the offset of the first value in `buf`, or -1 for None.
int64_t take_index(const std::optional<at::Tensor>& idx, int64_t size, size_t i, const char* what,
                   std::vector<int64_t>& buf, int64_t& count) {
  if (!idx.has_value()) {
    count = size;
    return -1;
  }
  const at::Tensor& t = *idx;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, where(i, what),
                    " indices must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, where(i, what), " indices must be 1-D, got ", t.dim(), "-D");
  at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t n = c.numel();
  const int64_t off = static_cast<int64_t>(buf.size());
  buf.reserve(buf.size() + n);
  for (int64_t k = 0; k < n; ++k) {
    // Checked before anything is written: an out-of-range index is an error, never a read.
    TORCH_CHECK_VALUE(p[k] >= 0 && p[k] < size, where(i, what), " index ", p[k],
                      " out of range [0, ", size, ")");
    buf.push_back(p[k]);
  }
  count = n;
  return off;
}

// True when dims [2, ndim) of `t` can be walked as one dim of stride `*s2`.
bool collapse_inner(const at::Tensor& t, int64_t* s2) {
  int64_t expected = -1;
  *s2 = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (expected == -1) {
      *s2 = t.stride(d);
    } else if (t.stride(d) != expected) {
      return false;
    }
    expected = t.stride(d) * t.size(d);
  }
  return true;
}

template <typename T>
inline void gather_cols(uint8_t* dst, const uint8_t* base, const int64_t* cols, int64_t n, int64_t s1) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(base);
  if (cols) {
    for (int64_t j = 0; j < n; ++j) std::memcpy(d + j, s + cols[j] * s1, sizeof(T));
  } else {
    for (int64_t j = 0; j < n; ++j) std::memcpy(d + j, s + j * s1, sizeof(T));
  }
}

// Columns of `k` contiguous elements each (a small conv kernel), copied as typed elements.
template <typename T>
inline void gather_chunks(uint8_t* dst, const uint8_t* base, const int64_t* cols, int64_t n, int64_t s1,
                          int64_t k) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(base);
  for (int64_t j = 0; j < n; ++j) {
    const T* src = s + (cols ? cols[j] : j) * s1;
    for (int64_t q = 0; q < k; ++q) std::memcpy(d + q, src + q, sizeof(T));
    d += k;
  }
}

// Copies output row `i` of `job` (bytes only: bitwise exact for every dtype).
void copy_row(const SliceJob& job, int64_t i) {
  const int64_t e = job.esize;
  const int64_t r = job.rows ? job.rows[i] : i;
  const uint8_t* base = job.src + r * job.s0 * e;
  uint8_t* out = job.dst + i * job.n_cols * job.inner * e;
  if (job.inner == 1 || job.s2 == 1) {
    const int64_t chunk = job.inner * e;  // contiguous bytes per column
    if (!job.cols && job.s1 == job.inner) {
      std::memcpy(out, base, job.n_cols * chunk);
      return;
    }
    if (job.inner == 1) {
      switch (e) {
        case 1: return gather_cols<uint8_t>(out, base, job.cols, job.n_cols, job.s1);
        case 2: return gather_cols<uint16_t>(out, base, job.cols, job.n_cols, job.s1);
        case 4: return gather_cols<uint32_t>(out, base, job.cols, job.n_cols, job.s1);
        case 8: return gather_cols<uint64_t>(out, base, job.cols, job.n_cols, job.s1);
        default: break;
      }
    }
    if (chunk < 64) {  // e.g. a 3x3 kernel: a library memcpy call per column costs more than the copy
      switch (e) {
        case 1: return gather_chunks<uint8_t>(out, base, job.cols, job.n_cols, job.s1, job.inner);
        case 2: return gather_chunks<uint16_t>(out, base, job.cols, job.n_cols, job.s1, job.inner);
        case 4: return gather_chunks<uint32_t>(out, base, job.cols, job.n_cols, job.s1, job.inner);
        case 8: return gather_chunks<uint64_t>(out, base, job.cols, job.n_cols, job.s1, job.inner);
        default: break;
      }
    }
    for (int64_t j = 0; j < job.n_cols; ++j) {
      const int64_t c = job.cols ? job.cols[j] : j;
      std::memcpy(out + j * chunk, base + c * job.s1 * e, chunk);
    }
    return;
  }
  for (int64_t j = 0; j < job.n_cols; ++j) {
    const int64_t c = job.cols ? job.cols[j] : j;
    const uint8_t* col = base + c * job.s1 * e;
    uint8_t* o = out + j * job.inner * e;
    for (int64_t k = 0; k < job.inner; ++k) std::memcpy(o + k * e, col + k * job.s2 * e, e);
  }
}

}  // namespace

// Fills dsts[i] with srcs[i] gathered at rows[i] (dim 0) and cols[i] (dim 1).
void slice_many(const std::vector<at::Tensor>& srcs, const std::vector<std::optional<at::Tensor>>& rows,
                const std::vector<std::optional<at::Tensor>>& cols, const std::vector<at::Tensor>& dsts) {
  const size_t n = srcs.size();
  TORCH_CHECK_VALUE(rows.size() == n && cols.size() == n && dsts.size() == n,
                    "slice_many: srcs, rows, cols and dsts must have the same length, got ", n, ", ",
                    rows.size(), ", ", cols.size(), ", ", dsts.size());
  if (n == 0) return;
  // Everything below is C++ on tensors the caller keeps alive: other Python threads run while
  // the indices are checked and the bytes are copied (an export can copy gigabytes).
  pybind11::gil_scoped_release no_gil;
  const at::Device device = srcs[0].device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "slice_many: tensors must be on CPU or CUDA, got ",
                    device);
  std::vector<SliceJob> jobs;
  std::vector<at::Tensor> keep_alive;  // contiguous copies of sources whose inner dims do not collapse
  std::vector<int64_t> index;          // every index, int64, on the host
  std::vector<std::pair<int64_t, int64_t>> index_off;
  jobs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    at::Tensor src = srcs[i];
    const at::Tensor& dst = dsts[i];
    TORCH_CHECK_VALUE(src.device() == device && dst.device() == device, where(i, "is on "), src.device(),
                      " (destination on ", dst.device(), "); every tensor must be on ", device);
    TORCH_CHECK_VALUE(src.layout() == at::kStrided && !src.is_quantized() && !src.is_nested(),
                      where(i, "must be a dense strided tensor"));
    TORCH_CHECK_VALUE(dst.scalar_type() == src.scalar_type(), where(i, "destination dtype "),
                      dst.scalar_type(), " != source dtype ", src.scalar_type());
    TORCH_CHECK_VALUE(dst.is_contiguous(), where(i, "destination must be contiguous"));
    TORCH_CHECK_VALUE(src.dim() >= 1, where(i, "is 0-d; only tensors with at least one dim can be sliced"));
    TORCH_CHECK_VALUE(src.dim() >= 2 || !cols[i].has_value(),
                      where(i, "is 1-D; column indices need at least 2 dims"));
    int64_t nr = 0, nc = 0;
    const int64_t ro = take_index(rows[i], src.size(0), i, "row", index, nr);
    int64_t co = -1;
    if (src.dim() >= 2) co = take_index(cols[i], src.size(1), i, "column", index, nc);
    std::vector<int64_t> shape = src.sizes().vec();
    shape[0] = nr;
    if (src.dim() >= 2) shape[1] = nc;
    TORCH_CHECK_VALUE(dst.sizes().vec() == shape, where(i, "destination shape "), dst.sizes(),
                      " != expected ", at::IntArrayRef(shape));
    if (dst.numel() == 0) continue;
    int64_t s2 = 1;
    if (!collapse_inner(src, &s2)) {
      src = src.contiguous();
      keep_alive.push_back(src);
      s2 = 1;
    }
    at::assert_no_overlap(dst, src);
    SliceJob job{};
    job.src = static_cast<const uint8_t*>(src.const_data_ptr());
    job.dst = static_cast<uint8_t*>(dst.data_ptr());
    job.esize = src.element_size();
    if (src.dim() == 1) {  // [N] -> [1, N, 1], the row index becomes the column index
      job.n_rows = 1;
      job.n_cols = nr;
      job.inner = 1;
      job.s0 = 0;
      job.s1 = src.stride(0);
      job.s2 = 1;
      index_off.emplace_back(-1, ro);
    } else {
      job.n_rows = nr;
      job.n_cols = nc;
      job.inner = src.numel() / (src.size(0) * src.size(1));
      job.s0 = src.stride(0);
      job.s1 = src.stride(1);
      job.s2 = s2;
      index_off.emplace_back(ro, co);
    }
    jobs.push_back(job);
  }
  if (jobs.empty()) return;
  // Blocks of whole output rows, each about kBlockBytes of output.
  std::vector<SliceBlock> blocks;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t row_bytes = std::max<int64_t>(1, jobs[j].n_cols * jobs[j].inner * jobs[j].esize);
    const int64_t per = std::max<int64_t>(1, kBlockBytes / row_bytes);
    for (int64_t r = 0; r < jobs[j].n_rows; r += per)
      blocks.push_back({static_cast<int64_t>(j), r, std::min(jobs[j].n_rows, r + per)});
  }
  if (device.is_cuda()) {
#ifdef WITH_CUDA
    for (size_t j = 0; j < jobs.size(); ++j) {  // host offsets, +1 so that 0 means identity
      jobs[j].rows = reinterpret_cast<const int64_t*>(index_off[j].first + 1);
      jobs[j].cols = reinterpret_cast<const int64_t*>(index_off[j].second + 1);
    }
    slice_many_cuda(jobs, blocks, index, device);
    return;
#else
    TORCH_CHECK_VALUE(false, "slice_many: this build of hawada._C has no CUDA support; rebuild with CUDA");
#endif
  }
  for (size_t j = 0; j < jobs.size(); ++j) {
    jobs[j].rows = index_off[j].first < 0 ? nullptr : index.data() + index_off[j].first;
    jobs[j].cols = index_off[j].second < 0 ? nullptr : index.data() + index_off[j].second;
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const SliceBlock& blk = blocks[b];
      for (int64_t r = blk.row0; r < blk.row1; ++r) copy_row(jobs[blk.job], r);
    }
  });
}

}  // namespace hawada
