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

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/numeric.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

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

// ---- Reduce-then-update steps (LARS, LAMB) ------------------------------------
//
// A LARS or LAMB step needs a per-tensor reduction (norms) over a tensor before
// any element of it may be updated. Done as two sweeps over all tensors, every
// byte of the norm inputs comes from memory twice. Done tensor by tensor, the
// update re-reads what the reduction just brought into the caches.
//
// Each entry is handled one of two ways:
//  - whole: one thread reduces the entry's segments, combines them, then
//    updates the entry from its end backwards, so the most recently reduced
//    data (still in L2, then L3) is read first and only what no longer fits
//    comes from memory again. Whole entries are grouped into work items of
//    about kChunk elements (many small tensors share one item) and the items
//    are handed out largest first.
//  - shared: an entry larger than the caches (kWholeMax), or one so large that
//    a single thread would be left working on it alone at the end, is split
//    over all threads: each reduces a static range of its segments, all wait
//    at one barrier for the combined norms, then each updates its own range
//    backwards. (Whole entries need no barrier at all, which matters on a
//    busy machine, where a barrier can wait out a descheduled thread.)
//
// The reduction works on exactly the segments of make_plan and combines their
// partials in segment order, like the two-sweep form, so both give the same
// bits; update blocks start at segment starts and are multiples of kBlock
// elements (a multiple of every vector width), so every element goes through
// the same instructions (vector body or scalar tail) as in one call per segment.

// Elements per update block: the unit of the backwards walk.
constexpr int64_t kBlock = int64_t(1) << 14;

// Entries above this many elements are shared by all threads (see above):
// 2^22 float32 elements of param and grad take 32 MB, an L3's worth, so past
// this one thread's walk gains little from the cache and splitting costs
// nothing but one barrier. Smaller entries go whole to one thread, with no
// barrier, unless one alone would unbalance the threads.
constexpr int64_t kWholeMax = int64_t(1) << 22;

// Environment variable that forces the two-sweep form (the reference for the
// bit-exactness tests, and a fallback to compare speed against).
constexpr const char* kTwoPassEnv = "FASTSGD_CPU_TWO_PASS";

inline bool two_pass_forced() {
  const char* v = std::getenv(kTwoPassEnv);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

struct ReducePlan {
  std::vector<int64_t> shared;      // entries split over all threads, in entry order
  std::vector<int64_t> whole;       // entries done by one thread each, grouped into items:
  std::vector<int64_t> item_start;  // item k holds whole[item_start[k] .. item_start[k + 1]), largest item first
  int64_t num_items() const { return int64_t(item_start.size()) - 1; }
};

// An entry is shared when it is larger than kWholeMax, or when it alone is
// more than half of one thread's share of the step (it would leave the other
// threads idle at the end), and it has at least two segments to split.
inline ReducePlan make_reduce_plan(const Plan& plan, int threads) {
  ReducePlan rp;
  const int64_t entries = int64_t(plan.entry_start.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> items;  // (first, last) into rp.whole
  std::vector<int64_t> item_numel;
  int64_t in_item = 0, item_first = 0;
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t first = plan.entry_start[size_t(e)], last = plan.entry_start[size_t(e) + 1];
    if (first == last) continue;  // empty tensor: nothing to reduce or update
    const int64_t numel = plan.segments[size_t(last - 1)].end;
    if (threads > 1 && last - first >= 2 && (numel > kWholeMax || numel * 2 * threads > plan.total)) {
      rp.shared.push_back(e);
      continue;
    }
    rp.whole.push_back(e);
    in_item += numel;
    if (in_item >= kChunk) {
      items.emplace_back(item_first, int64_t(rp.whole.size()));
      item_numel.push_back(in_item);
      item_first = int64_t(rp.whole.size());
      in_item = 0;
    }
  }
  if (in_item > 0) {
    items.emplace_back(item_first, int64_t(rp.whole.size()));
    item_numel.push_back(in_item);
  }
  std::vector<int64_t> order(items.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = int64_t(k);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return item_numel[size_t(a)] > item_numel[size_t(b)]; });
  std::vector<int64_t> whole;
  whole.reserve(rp.whole.size());
  rp.item_start.push_back(0);
  for (const int64_t k : order) {
    for (int64_t i = items[size_t(k)].first; i < items[size_t(k)].second; ++i) whole.push_back(rp.whole[size_t(i)]);
    rp.item_start.push_back(int64_t(whole.size()));
  }
  rp.whole = std::move(whole);
  return rp;
}

// Calls update(entry, begin, end, coeffs) over [seg_first, seg_last) of the
// plan's segments, last block first.
template <class Update, class Coeffs>
void update_backwards(const Plan& plan, int64_t seg_first, int64_t seg_last, const Coeffs& c, Update& update) {
  for (int64_t s = seg_last - 1; s >= seg_first; --s) {
    const Segment& seg = plan.segments[size_t(s)];
    const int64_t blocks = (seg.end - seg.begin + kBlock - 1) / kBlock;
    for (int64_t b = blocks - 1; b >= 0; --b) {
      const int64_t begin = seg.begin + b * kBlock;
      const int64_t end = begin + kBlock < seg.end ? begin + kBlock : seg.end;
      update(seg.entry, begin, end, c);
    }
  }
}

// The reduce-then-update step over all entries:
//   reduce(s)                       partials of segment s (written to the caller's per-segment storage)
//   finish(e) -> coeffs             combine entry e's partials in segment order; called once per entry and
//                                   thread that updates part of it, so it must only read shared state
//   update(e, begin, end, coeffs)   update elements [begin, end) of entry e
// With the two-sweep form forced, every reduce runs first, then every update.
template <class Reduce, class Finish, class Update>
void for_each_entry_reduce_update(const Plan& plan, int threads, Reduce&& reduce, Finish&& finish,
                                  Update&& update) {
  const int64_t useful = plan.total / kMinPerThread;
  if (useful < threads) threads = useful > 1 ? int(useful) : 1;
  if (two_pass_forced()) {
    for_each_segment(plan, threads, reduce);
    using C = decltype(finish(int64_t(0)));
    std::vector<C> coeffs;
    const int64_t entries = int64_t(plan.entry_start.size()) - 1;
    coeffs.reserve(size_t(entries));
    for (int64_t e = 0; e < entries; ++e) coeffs.push_back(finish(e));
    for_each_segment(plan, threads, [&](int64_t s) {
      const Segment& seg = plan.segments[size_t(s)];
      update(seg.entry, seg.begin, seg.end, coeffs[size_t(seg.entry)]);
    });
    return;
  }
  const ReducePlan rp = make_reduce_plan(plan, threads);
  auto whole_item = [&](int64_t k) {
    for (int64_t i = rp.item_start[size_t(k)]; i < rp.item_start[size_t(k) + 1]; ++i) {
      const int64_t e = rp.whole[size_t(i)];
      const int64_t first = plan.entry_start[size_t(e)], last = plan.entry_start[size_t(e) + 1];
      for (int64_t s = first; s < last; ++s) reduce(s);
      update_backwards(plan, first, last, finish(e), update);
    }
  };
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      for (const int64_t e : rp.shared) {
        const int64_t first = plan.entry_start[size_t(e)], count = plan.entry_start[size_t(e) + 1] - first;
        const int64_t lo = first + count * t / nt, hi = first + count * (t + 1) / nt;
        for (int64_t s = lo; s < hi; ++s) reduce(s);
#pragma omp barrier
        update_backwards(plan, lo, hi, finish(e), update);
      }
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t k = 0; k < rp.num_items(); ++k) whole_item(k);
    }
    return;
  }
#endif
  for (int64_t k = 0; k < rp.num_items(); ++k) whole_item(k);
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
