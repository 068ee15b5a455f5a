// The CUDA execution-model emulator behind csrc/emulation/cuda_runtime.h.
//
// A launch runs its blocks one after another. Each block's threads are
// ucontext fibers on the calling thread: a fiber runs until it reaches a
// barrier (or finishes) and then yields to the block's scheduler. When no
// fiber can run, the scheduler releases whichever barrier every live
// participant has reached: a warp op once all live lanes of that warp wait on
// it, __syncthreads once every thread of the block waits on it. Anything else
// is a bug in the kernel (divergent barrier, full-mask shuffle with exited
// lanes, deadlock) and fails the launch with a message saying which.
#include "cuda_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "emulator_control.h"

namespace pbrf_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kSharedLimitBytes = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr size_t kGuardBytes = 64;
constexpr unsigned char kPoison = 0xFF;          // NaN in every float format
constexpr size_t kSlotBytes = 16;                // widest shuffled type
constexpr int kEmulatedMultiprocessors = 2;      // small, so grid-stride loops really stride

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  dim3 index;
  int warp = 0, lane = 0;
  State state = State::kReady;
  unsigned mask = 0;  // lanes named by the warp op this fiber waits on
  int predicate = 0;  // its __syncthreads_or argument
};

struct Region {
  std::vector<unsigned char> bytes;  // size + guard
  size_t size = 0;
};

struct Block {
  dim3 grid, dim, index;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::unordered_map<const void*, Region> statics;
  Region dynamic;
  size_t static_bytes = 0;
  int or_result = 0;
  std::vector<unsigned char> slots;  // shuffle mailboxes: warp, lane, kSlotBytes
  std::string error;
};

thread_local Block* active = nullptr;
std::mutex launch_mutex;  // one emulated launch at a time (the kernels share statics)
std::vector<std::unique_ptr<char[]>> stacks;

struct Settings {
  ThreadOrder order = ThreadOrder::kForward;
  uint64_t seed = 0;
} settings;

struct ErrorState {
  cudaError_t code = cudaSuccess;
  std::string detail;
} last_error;

Counters counters;

void record_error(cudaError_t code, const std::string& detail) {
  if (last_error.code == cudaSuccess) {  // the first error is the one worth reporting
    last_error.code = code;
    last_error.detail = detail;
  }
}

Block& block() {
  if (active == nullptr || active->current == nullptr)
    throw std::logic_error("CUDA device function called outside an emulated kernel");
  return *active;
}

// Suspends the running fiber in `state`; returns when the scheduler resumes it.
void wait_as(State state) {
  Block& b = block();
  Fiber* f = b.current;
  f->state = state;
  swapcontext(&f->context, &b.scheduler);
}

void fiber_entry() {
  Block* b = active;
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = std::string("kernel raised: ") + e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "kernel raised an unknown exception";
  }
  b->current->state = State::kDone;
  // Returning resumes uc_link: the scheduler.
}

std::string describe_states(const Block& b) {
  int counts[4] = {0, 0, 0, 0};
  for (const Fiber& f : b.fibers) ++counts[int(f.state)];
  return std::to_string(counts[1]) + " at __syncthreads, " + std::to_string(counts[2]) +
         " at a warp op, " + std::to_string(counts[3]) + " exited, of " +
         std::to_string(b.fibers.size()) + " threads";
}

std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.index.x) + "," + std::to_string(b.index.y) + "," +
         std::to_string(b.index.z) + ")";
}

// Releases the barriers that every live participant has reached; false if none could be.
bool release_barriers(Block& b) {
  bool released = false;
  const int warps = int((b.fibers.size() + kWarpSize - 1) / kWarpSize);
  for (int w = 0; w < warps; ++w) {
    unsigned live = 0, waiting = 0;
    const size_t first = size_t(w) * kWarpSize, last = std::min(b.fibers.size(), first + kWarpSize);
    for (size_t i = first; i < last; ++i) {
      const Fiber& f = b.fibers[i];
      if (f.state != State::kDone) live |= 1u << f.lane;
      if (f.state == State::kWarpBarrier) waiting |= 1u << f.lane;
    }
    if (waiting == 0 || waiting != live) continue;
    for (size_t i = first; i < last; ++i) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kWarpBarrier) continue;
      if (f.mask != live) {
        char text[160];
        std::snprintf(text, sizeof text,
                      "warp %d: warp op with mask 0x%08x, but the live lanes are 0x%08x "
                      "(lanes exited early or do not exist)", w, f.mask, live);
        b.error = text;
        return false;
      }
      f.state = State::kReady;
    }
    released = true;
  }
  if (released) return true;

  // __syncthreads releases only once every thread of the block waits on it; a thread
  // that exited or waits elsewhere is reported by the caller.
  int any = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state != State::kBlockBarrier) return false;
    any |= f.predicate;
  }
  b.or_result = any != 0;
  for (Fiber& f : b.fibers) f.state = State::kReady;
  ++counters.barriers;
  return true;
}

void prepare_block(Block& b, size_t dynamic_bytes) {
  const size_t threads = b.fibers.size();
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  b.statics.clear();
  b.static_bytes = 0;
  b.dynamic.size = dynamic_bytes;
  b.dynamic.bytes.assign(dynamic_bytes + kGuardBytes, kPoison);
  b.slots.assign(((threads + kWarpSize - 1) / kWarpSize) * kWarpSize * kSlotBytes, kPoison);
  b.or_result = 0;
  b.error.clear();
  size_t t = 0;
  for (unsigned z = 0; z < b.dim.z; ++z)
    for (unsigned y = 0; y < b.dim.y; ++y)
      for (unsigned x = 0; x < b.dim.x; ++x, ++t) {
        Fiber& f = b.fibers[t];
        f.stack = stacks[t].get();
        f.index = dim3(x, y, z);
        f.warp = int(t / kWarpSize);
        f.lane = int(t % kWarpSize);
        f.state = State::kReady;
        f.mask = 0;
        f.predicate = 0;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, fiber_entry, 0);
      }
}

// 0 .. count-1 in the configured order; `stream` varies the shuffle between uses.
std::vector<size_t> run_order(size_t count, uint64_t stream) {
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  if (settings.order == ThreadOrder::kReverse) std::reverse(order.begin(), order.end());
  if (settings.order == ThreadOrder::kShuffled) {
    std::mt19937_64 rng(settings.seed * 0x9E3779B97F4A7C15ull + stream);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

void check_guards(Block& b) {
  auto intact = [](const Region& r) {
    for (size_t i = r.size; i < r.bytes.size(); ++i)
      if (r.bytes[i] != kPoison) return false;
    return true;
  };
  if (!intact(b.dynamic))
    b.error = "write past the end of the " + std::to_string(b.dynamic.size) +
              " bytes of dynamic shared memory";
  for (const auto& entry : b.statics)
    if (!intact(entry.second))
      b.error = "write past the end of a " + std::to_string(entry.second.size) +
                "-byte __shared__ array";
}

// Runs one block to completion; returns false (with b.error set) on a kernel bug.
bool run_block(Block& b, size_t dynamic_bytes, uint64_t block_number) {
  prepare_block(b, dynamic_bytes);
  const std::vector<size_t> order = run_order(b.fibers.size(), block_number);
  for (;;) {
    for (size_t i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kReady) continue;
      b.current = &f;
      swapcontext(&b.scheduler, &f.context);
      b.current = nullptr;
      if (!b.error.empty()) return false;
    }
    const bool all_done = std::all_of(b.fibers.begin(), b.fibers.end(),
                                      [](const Fiber& f) { return f.state == State::kDone; });
    if (all_done) break;
    if (!release_barriers(b)) {
      if (b.error.empty()) {
        const bool exited = std::any_of(b.fibers.begin(), b.fibers.end(),
                                        [](const Fiber& f) { return f.state == State::kDone; });
        b.error = std::string(exited ? "divergent barrier: some threads exited while others wait ("
                                     : "deadlock: threads wait on different barriers (") +
                  describe_states(b) + ")";
      }
      return false;
    }
  }
  check_guards(b);
  return b.error.empty();
}

std::string check_configuration(dim3 grid, dim3 block, size_t shared) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "grid has a zero dimension";
  if (grid.y > 65535 || grid.z > 65535) return "grid y or z above 65535";
  if (threads == 0) return "block has a zero dimension";
  if (threads > kMaxThreadsPerBlock || block.z > 64)
    return "block of " + std::to_string(threads) + " threads (at most 1024, z at most 64)";
  if (shared > kSharedLimitBytes)
    return std::to_string(shared) + " bytes of dynamic shared memory (at most 48 KiB)";
  return "";
}

}  // namespace

const dim3& thread_index() { return block().current->index; }
const dim3& block_index() { return block().index; }
const dim3& block_dim() { return block().dim; }
const dim3& grid_dim() { return block().grid; }

void sync_threads() {
  block().current->predicate = 0;
  wait_as(State::kBlockBarrier);
}

int sync_threads_or(int predicate) {
  block().current->predicate = predicate != 0;
  wait_as(State::kBlockBarrier);
  return block().or_result;
}

void sync_warp(unsigned mask) {
  block().current->mask = mask;
  wait_as(State::kWarpBarrier);
}

void shuffle_xor(unsigned mask, const void* value, void* result, size_t bytes, int lane_mask,
                 int width) {
  Block& b = block();
  if (width != kWarpSize) throw std::invalid_argument("shuffle width other than 32 is not emulated");
  Fiber* f = b.current;
  unsigned char* warp_slots = b.slots.data() + size_t(f->warp) * kWarpSize * kSlotBytes;
  std::memcpy(warp_slots + size_t(f->lane) * kSlotBytes, value, bytes);
  sync_warp(mask);  // every lane has posted its value
  const int source = f->lane ^ lane_mask;
  if (source < kWarpSize && (mask >> source & 1u))
    std::memcpy(result, warp_slots + size_t(source) * kSlotBytes, bytes);
  else
    std::memcpy(result, value, bytes);  // hardware returns the caller's own value
  ++counters.shuffles;
  sync_warp(mask);  // every lane has read before the mailboxes are reused
}

void* static_shared(const void* key, size_t bytes) {
  Block& b = block();
  auto found = b.statics.find(key);
  if (found != b.statics.end()) return found->second.bytes.data();
  b.static_bytes += bytes;
  if (b.static_bytes + b.dynamic.size > kSharedLimitBytes)
    throw std::length_error("block uses " + std::to_string(b.static_bytes + b.dynamic.size) +
                            " bytes of shared memory (at most 48 KiB)");
  Region& region = b.statics[key];
  region.size = bytes;
  region.bytes.assign(bytes + kGuardBytes, kPoison);
  return region.bytes.data();
}

void* dynamic_shared() {
  Block& b = block();
  return b.dynamic.size ? b.dynamic.bytes.data() : nullptr;
}

void run_kernel(dim3 grid, dim3 dim, size_t shared_bytes, const std::function<void()>& body) {
  const std::string bad = check_configuration(grid, dim, shared_bytes);
  if (!bad.empty()) {
    record_error(cudaErrorInvalidConfiguration, "invalid launch configuration: " + bad);
    return;
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  Block b;
  b.grid = grid;
  b.dim = dim;
  b.body = &body;
  b.fibers.resize(size_t(dim.x) * dim.y * dim.z);
  Block* outer = active;
  active = &b;
  ++counters.launches;
  // Blocks run in the same order as threads (forward, reverse, shuffled): two blocks
  // that write one location without atomics then give an order-dependent result.
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const std::vector<size_t> block_order = run_order(blocks, counters.launches);
  for (size_t number : block_order) {
    b.index = dim3(unsigned(number % grid.x), unsigned(number / grid.x % grid.y),
                   unsigned(number / (uint64_t(grid.x) * grid.y)));
    ++counters.blocks;
    counters.threads += b.fibers.size();
    if (!run_block(b, shared_bytes, number)) {
      record_error(cudaErrorLaunchFailure, block_name(b) + ": " + b.error);
      active = outer;
      return;
    }
  }
  active = outer;
}

// ------------------------------------------------------------------ control (emulator_control.h)
void set_thread_order(ThreadOrder order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  settings.order = order;
  settings.seed = seed;
}

Counters read_counters() { return counters; }

void reset() {
  std::lock_guard<std::mutex> lock(launch_mutex);
  counters = Counters{};
  last_error = ErrorState{};
}

}  // namespace pbrf_emu

// ------------------------------------------------------------------------------ runtime API
using pbrf_emu::last_error;

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device == 0) return cudaSuccess;
  pbrf_emu::record_error(cudaErrorInvalidDevice, "the emulator has one device, ordinal 0");
  return cudaErrorInvalidDevice;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = pbrf_emu::kEmulatedMultiprocessors;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "pbrf_fast CUDA emulator (CPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = pbrf_emu::kEmulatedMultiprocessors;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t code = last_error.code;
  last_error.code = cudaSuccess;  // the detail stays readable through cudaGetErrorString
  return code;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  if (!last_error.detail.empty()) return last_error.detail.c_str();
  return cudaGetErrorName(err);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
