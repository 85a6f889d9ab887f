// Programmatic dependent launch (sm_90 and later). With LIPSTREAM_PDL=1 the launcher
// (kernels/mod.rs) lets each of our kernels be scheduled while the kernel before it on the
// stream is still finishing, to hide launch latency at one image a batch, where a frame is
// hundreds of short kernels. So every kernel starts here: it waits until the grid before it
// has completed and its writes are visible (nothing may be read or written before), then lets
// the grid after it start launching. Launched the ordinary way, the wait returns at once; on
// older GPUs this is empty.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LS_PDL_ENTER()                                      \
  do {                                                      \
    asm volatile("griddepcontrol.wait;\n" ::: "memory");    \
    asm volatile("griddepcontrol.launch_dependents;\n" ::); \
  } while (0)
#else
#define LS_PDL_ENTER() \
  do {                 \
  } while (0)
#endif
