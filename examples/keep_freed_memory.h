#pragma once
// Shared by the examples' programs.

#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace examples {

/// glibc hands every block above its mmap threshold back to the kernel on
/// free, so each large tensor costs fresh pages: the typeface example's
/// sampling on the CPU spent as long in page faults as in arithmetic (wall
/// time 2.1x longer), and an SD-1.5 UNet's forward 10-15 % of its time.
/// Keeping freed memory in the heap removes that. Call it first in main.
inline void keep_freed_memory() {
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

} // namespace examples
