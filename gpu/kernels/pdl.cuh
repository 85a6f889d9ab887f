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

// Block order. A pass bound by memory that walks a buffer the step before it walked front to
// back finds the back of it still in L2 (50 MB on an H100) if it starts there; with `mirror`
// set (the executor decides, experiment LIPSTREAM_MIRROR_PASSES) a kernel's block (x, y) does
// the work of block (gx - 1 - x, gy - 1 - y), so the blocks that start first take the end.
// Every block's work, and so every result bit, stays the same.
__device__ __forceinline__ int ls_block_x(int mirror) { return mirror ? gridDim.x - 1 - blockIdx.x : blockIdx.x; }
__device__ __forceinline__ int ls_block_y(int mirror) { return mirror ? gridDim.y - 1 - blockIdx.y : blockIdx.y; }
