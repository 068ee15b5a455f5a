// Faulty kernels that the CUDA emulator must catch (emulator_selftest.cu).
#pragma once

#include <string>
#include <vector>

namespace pbrf_emu {

struct SelftestResult {
  std::string error;          // "" if the launch reported no error
  std::vector<float> values;  // what the kernel wrote (64 floats, -1 where it did not)
};

// name: block_sum, divergent_barrier, shared_overflow, uninitialized_shared,
// missing_barrier, block_race, shuffle_after_exit, too_many_threads, too_much_shared.
SelftestResult run_selftest(const std::string& name);

}  // namespace pbrf_emu
