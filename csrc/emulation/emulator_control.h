// Knobs and counters of the CUDA emulator (csrc/emulation/emulator.cpp), for
// the bindings of pbrf_fast._C_cuda_emu; the kernels never see this header.
#pragma once

#include <cstdint>

namespace pbrf_emu {

// Order in which a block's threads run between two barriers, and the blocks of a
// grid run. A kernel whose result changes with it reads memory another thread
// writes without a barrier, or has two blocks write one place without atomics.
enum class ThreadOrder { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Counters {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
};

void set_thread_order(ThreadOrder order, uint64_t seed);
Counters read_counters();
void reset();  // zero the counters and clear a pending error

}  // namespace pbrf_emu
