//! The media path: codecs, decoded frames and audio, the pipeline stage, the per-session worker.

pub mod audio;
pub mod clip;
pub mod codec;
pub mod frame;
pub mod hold;
pub mod mp4;
pub mod stage;
pub mod wav;
pub mod worker;
pub mod y4m;

/// For the readers' tests: every truncation of `good`, then 3000 copies with three bytes
/// overwritten (seeded; every other flip lands in the first `hot` bytes, where headers are),
/// each handed to `parse`, which must return rather than panic.
#[cfg(test)]
pub(crate) fn damage_sweep<T>(good: &[u8], hot: usize, seed: u32, parse: impl Fn(&[u8]) -> T) {
    for cut in 0..good.len() {
        let _ = parse(&good[..cut]);
    }
    let mut x = seed;
    for _ in 0..3000 {
        let mut b = good.to_vec();
        for _ in 0..3 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let i = (x >> 8) as usize % if x & 1 == 0 { hot } else { b.len() };
            b[i] = (x >> 24) as u8;
        }
        let _ = parse(&b);
    }
}
