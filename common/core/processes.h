// Process control for long commands (torch-free): stopping cleanly on SIGINT/SIGTERM, and starting
// the worker processes of data-parallel training (flexfed-owner train --nproc-per-node).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace flexfed {

// Installs SIGINT and SIGTERM handlers that only set a flag, which long work (training, audits)
// checks between units of work: it then saves what it has and exits with 128 + StopSignal().
// Returns the flag. Idempotent.
const std::atomic<bool>& InstallStopSignals();
int StopSignal();  // the signal that set the flag (0: none)

// For a process that trains on the CPU: keeps the memory it frees for its next allocations. glibc
// otherwise hands every freed block of 32 MiB or more back to the system, and the next one faults
// in fresh zeroed pages — a training step frees and allocates the same activations every time, so
// the bigger its tensors (more tokens per step) the more of it went to page faults (measured:
// docs/PERFORMANCE.md, issue #15). Large blocks then come from the heap, and its top is never
// trimmed: the resident size stays at the step's high-water mark, which every step reaches anyway.
// Process-wide and for the rest of the process; a no-op without glibc. Returns whether it applied.
bool KeepFreedMemoryForReuse();

// A size field of /proc/self/status in bytes ("VmRSS": resident now, "VmHWM": its peak), or -1.
int64_t ProcessStatusBytes(const std::string& field);

// Where the workers of one machine stand in a data-parallel group (common/train/distributed.h).
struct WorkerLaunch {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: a free port on this machine (one machine only)
};

// Runs this program again, with the same arguments, as `nproc_per_node` worker processes — ranks
// node_rank · nproc_per_node + i of nnodes · nproc_per_node, told by the environment torchrun uses
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) — and waits for them.
// SIGINT/SIGTERM are passed on (the workers checkpoint and stop together). When a worker fails or
// is killed, the others are killed at once (they would wait on it in a collective) and the error
// names it. Returns the exit code the launcher should end with: 0 when all succeeded, 128 + signal
// after a requested stop, 1 after a failure (with `failure` set to one line saying what happened).
int RunWorkers(const WorkerLaunch& launch, std::string* failure);

}  // namespace flexfed
