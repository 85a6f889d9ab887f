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
