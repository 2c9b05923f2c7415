// Batched gather of kept rows/columns of many tensors (see hawada/core/slicing.py).
//
// Every job views its source as [R, C, K] (dim 0, dim 1, the remaining dims collapsed) with
// element strides (s0, s1, s2) and writes the kept [R', C', K] block into a contiguous
// destination. A 1-D source [N] is the job [1, N, 1] whose column index is its row index.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace hawada {

// Plain-old-data so the CUDA path can copy the table to the device as bytes.
struct SliceJob {
  const uint8_t* src;
  uint8_t* dst;
  const int64_t* rows;  // nullptr: identity (all R rows)
  const int64_t* cols;  // nullptr: identity (all C columns)
  int64_t n_rows;       // R' (output rows)
  int64_t n_cols;       // C' (output columns)
  int64_t inner;        // K
  int64_t s0, s1, s2;   // source strides, in elements
  int64_t esize;        // bytes per element
};

// One unit of parallel work: output rows [row0, row1) of job `job`.
struct SliceBlock {
  int64_t job;
  int64_t row0;
  int64_t row1;
};

static_assert(sizeof(SliceJob) % 8 == 0, "SliceJob must pack to 8-byte multiples");
static_assert(sizeof(SliceBlock) % 8 == 0, "SliceBlock must pack to 8-byte multiples");

#ifdef WITH_CUDA
// Copies jobs, blocks and the host index buffer to `device` in one transfer and fills every
// destination with one kernel launch. Index pointers in `jobs` are offsets (in int64
// elements) into `host_index` plus one, 0 meaning identity.
void slice_many_cuda(const std::vector<SliceJob>& jobs, const std::vector<SliceBlock>& blocks,
                     const std::vector<int64_t>& host_index, const at::Device& device);
#endif

}  // namespace hawada
