//! The liveness planner: places every activation buffer at an offset inside one arena so that
//! buffers alive at the same step never overlap. Greedy by size (largest first, lowest offset
//! that fits among the already placed buffers whose lifetimes overlap), which packs the UNet's
//! and the VAE's activations close to their peak live size.

/// One buffer's size and the steps (inclusive) during which it holds data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub bytes: usize,
    pub first: usize,
    pub last: usize,
}

impl Lifetime {
    fn overlaps(&self, o: &Lifetime) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

/// Offsets (multiples of `align`) for each buffer, and the arena size they need.
pub fn place(buffers: &[Lifetime], align: usize) -> (Vec<usize>, usize) {
    let align = align.max(1);
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by(|&a, &b| {
        buffers[b]
            .bytes
            .cmp(&buffers[a].bytes)
            .then(buffers[a].first.cmp(&buffers[b].first))
    });
    let mut offsets = vec![0usize; buffers.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    let mut total = 0;
    for &i in &order {
        let size = buffers[i].bytes.div_ceil(align) * align;
        let mut taken: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| buffers[j].overlaps(&buffers[i]))
            .map(|&j| {
                (
                    offsets[j],
                    offsets[j] + buffers[j].bytes.div_ceil(align) * align,
                )
            })
            .collect();
        taken.sort_unstable();
        let mut at = 0;
        for (start, end) in taken {
            if start >= at + size {
                break;
            }
            at = at.max(end);
        }
        offsets[i] = at;
        total = total.max(at + size);
        placed.push(i);
    }
    (offsets, total)
}

/// The most bytes alive at any one step: no placement can use less.
pub fn peak(buffers: &[Lifetime], align: usize) -> usize {
    let steps = buffers
        .iter()
        .map(|b| b.last.saturating_add(1))
        .max()
        .unwrap_or(0);
    let mut events: Vec<(usize, isize)> = Vec::new();
    for b in buffers {
        let size = b.bytes.div_ceil(align.max(1)) * align.max(1);
        events.push((b.first, size as isize));
        events.push((b.last.saturating_add(1).min(steps), -(size as isize)));
    }
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut live, mut best) = (0isize, 0isize);
    for (_, d) in events {
        live += d;
        best = best.max(live);
    }
    best as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lt(bytes: usize, first: usize, last: usize) -> Lifetime {
        Lifetime { bytes, first, last }
    }

    #[test]
    fn live_buffers_never_overlap_and_dead_ones_share_memory() {
        let bufs = [
            lt(100, 0, 1),
            lt(100, 1, 2),
            lt(100, 2, 3),
            lt(100, 3, 4),
            lt(50, 0, 4),
        ];
        let (off, total) = place(&bufs, 16);
        let end = |i: usize| off[i] + bufs[i].bytes.div_ceil(16) * 16;
        for i in 0..bufs.len() {
            for j in 0..i {
                if bufs[i].overlaps(&bufs[j]) {
                    assert!(end(i) <= off[j] || end(j) <= off[i], "{i} {j} {off:?}");
                }
            }
        }
        // Two chains of 100-byte buffers alternate; plus the long-lived 50: 2*112 + 64.
        assert_eq!(total, 2 * 112 + 64);
        assert_eq!(total, peak(&bufs, 16));
    }

    #[test]
    fn placement_is_checked_pairwise_on_a_random_schedule() {
        let mut seed = 7u64;
        let mut next = |m: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % m
        };
        let bufs: Vec<Lifetime> = (0..300)
            .map(|_| {
                let first = next(200);
                lt(1 + next(5000), first, first + next(20))
            })
            .collect();
        let (off, total) = place(&bufs, 256);
        let end = |i: usize| off[i] + bufs[i].bytes.div_ceil(256) * 256;
        for i in 0..bufs.len() {
            assert!(end(i) <= total && off[i] % 256 == 0);
            for j in 0..i {
                if bufs[i].overlaps(&bufs[j]) {
                    assert!(end(i) <= off[j] || end(j) <= off[i], "{i} and {j} collide");
                }
            }
        }
        assert!(total >= peak(&bufs, 256));
        assert!(
            total
                < bufs
                    .iter()
                    .map(|b| b.bytes.div_ceil(256) * 256)
                    .sum::<usize>()
                    / 3
        );
    }
}
