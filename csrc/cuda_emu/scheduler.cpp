// The emulator's execution engine: blocks one after another, the threads of a
// block as cooperative fibers (ucontext) on the calling OS thread.
//
// A fiber runs until it reaches a barrier (__syncthreads, or the warp
// meeting inside a shuffle) or returns; the scheduler resumes the fibers
// round-robin. A barrier opens when every *live* thread of its scope has
// arrived -- a thread that has returned no longer counts, as on current GPUs.
// A full round in which no fiber arrives anywhere, leaves a barrier or
// finishes means some threads wait at a barrier the others never reach: that
// is reported as an error instead of hanging.
#include <ucontext.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

namespace fastsgd {
namespace emu {
namespace {

constexpr std::size_t kStackBytes = 128 * 1024;  // the kernels' frames are a few KB
constexpr unsigned kWarp = 32;

struct Barrier {
  unsigned arrived = 0;
  std::uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  unsigned live = 0;
  std::vector<unsigned> live_in_warp;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::uint64_t> slots;  // one 8-byte shuffle slot per thread
  std::uint64_t progress = 0;        // bumped by every arrival, opening and exit
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool running = false;
};

Block g;
std::uint64_t g_grids = 0;

void yield() { swapcontext(&g.fibers[g.current].context, &g.scheduler); }

void open_if_complete(Barrier& b, unsigned participants) {
  if (b.arrived > 0 && b.arrived >= participants) {
    b.arrived = 0;
    ++b.generation;
    ++g.progress;
  }
}

void wait(Barrier& b, unsigned participants) {
  const std::uint64_t generation = b.generation;
  ++b.arrived;
  ++g.progress;
  open_if_complete(b, participants);
  while (b.generation == generation) yield();
}

void fiber_main() {
  g.body(g.ctx);
  const unsigned me = g.current;
  g.fibers[me].done = true;
  --g.live;
  --g.live_in_warp[me / kWarp];
  ++g.progress;
  // Threads still waiting may now be all that is left of their scope.
  open_if_complete(g.block_barrier, g.live);
  open_if_complete(g.warp_barriers[me / kWarp], g.live_in_warp[me / kWarp]);
  // Returning resumes uc_link: the scheduler.
}

void run_block(unsigned threads) {
  const unsigned warps = (threads + kWarp - 1) / kWarp;
  g.live = threads;
  g.live_in_warp.assign(warps, 0);
  for (unsigned t = 0; t < threads; ++t) ++g.live_in_warp[t / kWarp];
  g.block_barrier = Barrier{};
  g.warp_barriers.assign(warps, Barrier{});
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = g.fibers[t];
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &g.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  while (g.live > 0) {
    const std::uint64_t before = g.progress;
    for (unsigned t = 0; t < threads; ++t) {
      if (g.fibers[t].done) continue;
      g.current = t;
      threadIdx = uint3{t, 0, 0};
      swapcontext(&g.scheduler, &g.fibers[t].context);
    }
    if (g.progress == before) {
      throw std::runtime_error("fastsgd cuda emulation: block " + std::to_string(blockIdx.x) + ": " +
                               std::to_string(g.live) + " threads wait at a barrier that the other threads "
                               "of the block (or warp) never reach");
    }
  }
}

}  // namespace

void sync_block() { wait(g.block_barrier, g.live); }

void sync_warp() {
  const unsigned w = g.current / kWarp;
  wait(g.warp_barriers[w], g.live_in_warp[w]);
}

std::uint64_t grids_run() { return g_grids; }

unsigned char* shuffle_slot(unsigned thread) { return reinterpret_cast<unsigned char*>(&g.slots[thread]); }

void run_grid(unsigned blocks, unsigned threads, void (*body)(void*), void* ctx) {
  if (g.running) throw std::logic_error("fastsgd cuda emulation: a kernel launched from inside a kernel");
  if (threads == 0 || threads > 1024) {
    throw std::invalid_argument("fastsgd cuda emulation: " + std::to_string(threads) + " threads per block");
  }
  while (g.fibers.size() < threads) {
    g.fibers.emplace_back();
    g.fibers.back().stack.reset(new char[kStackBytes]);
  }
  ++g_grids;
  g.slots.assign(threads, 0);
  g.body = body;
  g.ctx = ctx;
  g.running = true;
  blockDim = dim3{threads, 1, 1};
  gridDim = dim3{blocks, 1, 1};
  try {
    for (unsigned b = 0; b < blocks; ++b) {
      blockIdx = uint3{b, 0, 0};
      run_block(threads);
    }
  } catch (...) {
    g.running = false;  // the abandoned fibers' stacks are reused by the next launch
    throw;
  }
  g.running = false;
}

}  // namespace emu
}  // namespace fastsgd
