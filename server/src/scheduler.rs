//! The batching policy of a GPU worker: which sessions' frames go into the next batch, which
//! frames are given up as late, at which captured batch size.
//!
//! Pure and sans-IO: time comes in as `now`, nothing here sleeps, touches the GPU or the network.
//! Frame `i` of a session belongs to media time `40 i` ms; it can be rendered once its audio up
//! to `40 i + lookahead` ms has arrived, and must be out by `start + 40 i + output_delay`. Ready
//! frames are taken earliest deadline first (fair: a session passed over now has the earliest
//! deadline next tick), up to the largest captured batch profile; a frame that can no longer
//! make its deadline is handed back as late, to be replaced by the untouched input (camera) or
//! the idle frame (avatar).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Frames per second of every session's output.
pub const FRAME: Duration = Duration::from_millis(40);

/// Settings of one worker's policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Captured batch sizes, e.g. [1, 2, 4, 8, 16].
    pub profiles: Vec<usize>,
    /// Audio past a frame's start that the frame needs (MuseTalk: 40 ms frame + 80 ms).
    pub lookahead: Duration,
    /// Fixed delay from a frame's media time to its output time (the A/V delay).
    pub output_delay: Duration,
}

/// A frame to render or to give up: session key and frame index.
pub type FrameRef<K> = (K, u64);

/// What one tick decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick<K> {
    /// Frames for the GPU now, exactly the chosen profile's size, earliest deadline first.
    pub batch: Vec<FrameRef<K>>,
    /// The profile to replay (0 when the batch is empty).
    pub profile: usize,
    /// Frames given up: replace them and count them late.
    pub late: Vec<FrameRef<K>>,
}

struct Slot {
    start: Instant,
    next: u64,
    audio_until: Duration,
}

/// The policy's state over all sessions of one GPU.
pub struct Batcher<K> {
    policy: Policy,
    slots: BTreeMap<K, Slot>,
}

impl<K: Ord + Clone> Batcher<K> {
    /// `profiles` must hold 1 so a single ready frame can always run.
    pub fn new(mut policy: Policy) -> Self {
        policy.profiles.sort_unstable();
        policy.profiles.dedup();
        if policy.profiles.first() != Some(&1) {
            policy.profiles.insert(0, 1);
        }
        Batcher {
            policy,
            slots: BTreeMap::new(),
        }
    }

    /// A session whose media time 0 is `start`.
    pub fn add(&mut self, key: K, start: Instant) {
        self.slots.insert(
            key,
            Slot {
                start,
                next: 0,
                audio_until: Duration::ZERO,
            },
        );
    }

    pub fn remove(&mut self, key: &K) {
        self.slots.remove(key);
    }

    /// The session's audio has arrived up to media time `until`.
    pub fn audio_arrived(&mut self, key: &K, until: Duration) {
        if let Some(s) = self.slots.get_mut(key) {
            s.audio_until = s.audio_until.max(until);
        }
    }

    fn frame_time(i: u64) -> Duration {
        FRAME * i as u32
    }

    /// Decides the next batch at `now`, given how long a batch of each profile takes
    /// (`took(profile)`, measured by the worker).
    pub fn tick(&mut self, now: Instant, took: impl Fn(usize) -> Duration) -> Tick<K> {
        let mut tick = Tick {
            batch: Vec::new(),
            profile: 0,
            late: Vec::new(),
        };
        let p = &self.policy;
        // Give up frames that cannot be out in time even if run alone now.
        let alone = took(1);
        for (key, s) in self.slots.iter_mut() {
            loop {
                let deadline = s.start + Self::frame_time(s.next) + p.output_delay;
                if now + alone <= deadline {
                    break;
                }
                tick.late.push((key.clone(), s.next));
                s.next += 1;
            }
        }
        // Ready: due (its media time has come) and its audio is in.
        let mut ready: Vec<(Instant, K)> = self
            .slots
            .iter()
            .filter(|(_, s)| {
                let t = Self::frame_time(s.next);
                now >= s.start + t && s.audio_until >= t + p.lookahead
            })
            .map(|(k, s)| {
                (
                    s.start + Self::frame_time(s.next) + p.output_delay,
                    k.clone(),
                )
            })
            .collect();
        if ready.is_empty() {
            return tick;
        }
        ready.sort();
        // The largest profile that fits the ready count and still meets the earliest deadline.
        let earliest = ready[0].0;
        let profile = p
            .profiles
            .iter()
            .copied()
            .filter(|&b| b <= ready.len() && now + took(b) <= earliest)
            .max()
            .unwrap_or(1);
        for (_, key) in ready.into_iter().take(profile) {
            if let Some(s) = self.slots.get_mut(&key) {
                tick.batch.push((key, s.next));
                s.next += 1;
            }
        }
        tick.profile = profile;
        tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            profiles: vec![1, 2, 4, 8, 16],
            lookahead: Duration::from_millis(120),
            output_delay: Duration::from_millis(240),
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A batch takes 5 ms plus 1 ms per frame.
    fn took(b: usize) -> Duration {
        ms(5 + b as u64)
    }

    #[test]
    fn waits_for_audio_then_takes_the_largest_profile_that_fits() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy());
        for k in 0..5u32 {
            b.add(k, t0);
        }
        // Nobody's audio has arrived: nothing to do, nothing late.
        assert_eq!(
            b.tick(t0, took),
            Tick {
                batch: vec![],
                profile: 0,
                late: vec![]
            }
        );
        for k in 0..5u32 {
            b.audio_arrived(&k, ms(120));
        }
        let t = b.tick(t0 + ms(1), took);
        assert_eq!(t.profile, 4);
        assert_eq!(t.batch, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        // The fifth goes next tick, alone.
        let t = b.tick(t0 + ms(2), took);
        assert_eq!((t.profile, t.batch.clone()), (1, vec![(4, 0)]));
        // Frame 1 is not due before 40 ms, even with audio.
        b.audio_arrived(&0, ms(400));
        assert!(b.tick(t0 + ms(39), took).batch.is_empty());
        assert_eq!(b.tick(t0 + ms(40), took).batch, vec![(0, 1)]);
    }

    #[test]
    fn frames_that_cannot_make_their_deadline_are_given_up() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy());
        b.add("a", t0);
        // Audio stalls: frame 0 (out at 240 ms) is late once a lone batch (6 ms) cannot finish.
        assert!(b.tick(t0 + ms(234), took).late.is_empty());
        let t = b.tick(t0 + ms(235), took);
        assert_eq!(t.late, vec![("a", 0)]);
        // After a 2 s audio gap every missed frame is given up at once, and the stream resumes.
        let t = b.tick(t0 + ms(2235), took);
        assert_eq!(t.late.len(), 50);
        assert_eq!(t.late.last(), Some(&("a", 50)));
        b.audio_arrived(&"a", ms(3000));
        let t = b.tick(t0 + ms(2236), took);
        assert_eq!(t.batch, vec![("a", 51)]);
    }

    #[test]
    fn earliest_deadline_first_starves_nobody() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Policy {
            profiles: vec![1, 2],
            ..policy()
        });
        // Three sessions started 10 ms apart, all with plenty of audio; two slots per tick.
        for (k, off) in [(0u32, 0u64), (1, 10), (2, 20)] {
            b.add(k, t0 + ms(off));
            b.audio_arrived(&k, ms(10_000));
        }
        let mut served = [0u32; 3];
        let mut now = t0 + ms(20);
        for _ in 0..300 {
            let t = b.tick(now, took);
            assert!(t.late.is_empty(), "late at {:?}: {:?}", now - t0, t.late);
            for (k, _) in t.batch {
                served[k as usize] += 1;
            }
            now += ms(10);
        }
        // 3 s of ticks: each session got its ~75 frames; none fell behind the others.
        assert!(served.iter().all(|&n| (74..=76).contains(&n)), "{served:?}");
    }

    #[test]
    fn a_tight_deadline_picks_a_smaller_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy());
        for k in 0..8u32 {
            b.add(k, t0);
            b.audio_arrived(&k, ms(120));
        }
        // At 229 ms frame 0 is due out at 240: 8 frames (13 ms) would miss it, 4 (9 ms) do not.
        let t = b.tick(t0 + ms(229), took);
        assert_eq!(t.profile, 4);
        assert!(t.late.is_empty());
    }
}
