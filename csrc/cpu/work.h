// How a fused CPU step splits its tensors into parallel work.
//
// Python passes a table with one row per tensor ("entry"). Every entry is cut
// into segments of at most kChunk elements; consecutive segments are grouped
// into work items of about kChunk elements, so one huge tensor becomes many
// items and thousands of small tensors share items. Items are handed to
// OpenMP threads dynamically. The cut depends only on the sizes, never on the
// thread count, so per-segment partial sums combined in segment order give
// bit-identical norms run to run.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/numeric.h"

namespace fastsgd {
namespace cpu {

// Elements per segment / work item: large enough to amortise scheduling,
// small enough that both cores get work from a single mid-sized tensor.
constexpr int64_t kChunk = int64_t(1) << 18;

// Elements each extra thread must get before it is worth waking: below this a
// parallel region costs more than it saves (and on a busy machine a barrier
// can wait a whole scheduler time slice for a descheduled thread).
constexpr int64_t kMinPerThread = 4 * kChunk;

struct Segment {
  int64_t entry;
  int64_t begin;
  int64_t end;
};

struct Plan {
  std::vector<Segment> segments;
  std::vector<int64_t> item_start;   // item k holds segments [item_start[k], item_start[k + 1])
  std::vector<int64_t> entry_start;  // entry e holds segments [entry_start[e], entry_start[e + 1])
  int64_t total = 0;                 // elements over all entries

  int64_t num_items() const { return int64_t(item_start.size()) - 1; }
};

inline Plan make_plan(const std::vector<int64_t>& numel) {
  Plan plan;
  plan.entry_start.reserve(numel.size() + 1);
  plan.item_start.push_back(0);
  int64_t in_item = 0;
  for (size_t e = 0; e < numel.size(); ++e) {
    plan.entry_start.push_back(int64_t(plan.segments.size()));
    for (int64_t b = 0; b < numel[e]; b += kChunk) {
      const int64_t end = b + kChunk < numel[e] ? b + kChunk : numel[e];
      plan.segments.push_back({int64_t(e), b, end});
      in_item += end - b;
      plan.total += end - b;
      if (in_item >= kChunk) {
        plan.item_start.push_back(int64_t(plan.segments.size()));
        in_item = 0;
      }
    }
  }
  plan.entry_start.push_back(int64_t(plan.segments.size()));
  if (in_item > 0) plan.item_start.push_back(int64_t(plan.segments.size()));
  return plan;
}

// Runs f(segment_index) for every segment, items spread over up to `threads`
// threads (fewer when there is too little work to share).
template <class F>
void for_each_segment(const Plan& plan, int threads, F&& f) {
  const int64_t items = plan.num_items();
  const int64_t useful = plan.total / kMinPerThread;
  if (useful < threads) threads = useful > 1 ? int(useful) : 1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (items > 1 && threads > 1)
#endif
  for (int64_t k = 0; k < items; ++k) {
    for (int64_t s = plan.item_start[k]; s < plan.item_start[k + 1]; ++s) f(s);
  }
  (void)threads;
}

// A read-only view of Python's int64 table: `rows` rows of `width` fields.
struct Table {
  const int64_t* data;
  int64_t rows;
  int64_t width;
  int64_t at(int64_t row, int64_t field) const { return data[row * width + field]; }
};

inline Table table_from_address(int64_t address, int64_t rows, int64_t width, const char* what) {
  if (rows < 0) throw std::invalid_argument(std::string(what) + ": negative number of entries");
  if (rows > 0 && address == 0) throw std::invalid_argument(std::string(what) + ": null table address");
  return Table{reinterpret_cast<const int64_t*>(address), rows, width};
}

inline void check_dtype_code(int64_t code, const char* what, int64_t row) {
  if (code < 0 || code >= kNumDtypes) {
    throw std::invalid_argument(std::string(what) + ": entry " + std::to_string(row) + " has unknown dtype code " +
                                std::to_string(code));
  }
}

inline void check_pointer(int64_t address, const char* what, int64_t row, const char* field) {
  if (address == 0) {
    throw std::invalid_argument(std::string(what) + ": entry " + std::to_string(row) + " has a null " + field +
                                " pointer");
  }
}

template <class T>
T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

}  // namespace cpu
}  // namespace fastsgd
