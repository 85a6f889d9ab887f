#include <cuda_fp16.h>

// The tensor cores' m16n8k16 step (sm_80 and later), fp16 inputs, fp32 sums accumulated in c:
// the one shape the attention and thin-convolution kernels use. Fragments per the PTX ISA: lane
// (g = lane / 4, t = lane % 4) holds A rows g and g + 8 at k slots 2t, 2t + 1 (a0, a1) and
// 2t + 8, 2t + 9 (a2, a3), B column g at the same k slots (b0, b1), and C rows g, g + 8 at
// columns 2t, 2t + 1.
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  mma16816(c, a[0], a[1], a[2], a[3], b0, b1);
}

// Four 8x8 fp16 matrices from shared memory, one register each: lanes 8j..8j+7 address matrix
// j's rows (16 bytes each). With lanes 0-15 on rows 0-15 at k 0-7 and lanes 16-31 on the same
// rows at k 8-15, the four registers are an A fragment (a0..a3); with lanes 0-15 on two n8
// tiles' rows at k 0-7, then 8-15, they are two B fragments.
__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                            const __half* row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}
