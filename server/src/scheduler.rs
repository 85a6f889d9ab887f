//! The batching policy of a GPU worker: which waiting frames go into the next batch, which are
//! given up as late, at which captured batch size.
//!
//! Pure and sans-IO: time comes in as `now`, nothing here sleeps, touches the GPU or the network.
//! A session's media worker submits a frame once the audio its prompt needs has arrived (its A/V
//! hold releases it), with the instant it must be out by. Each tick gives up the frames that
//! could no longer make it even alone, then takes the waiting frames earliest deadline first (a
//! session passed over now has the earliest deadline next tick, so nobody starves) up to the
//! largest captured batch profile that fits the count and still meets the earliest deadline.
//! A frame goes out at its deadline whether it is rendered early or just in time, so finishing
//! early buys nothing: while fewer frames wait than the largest profile takes, the batcher waits
//! for more, until the latest moment at which the next larger profile would still meet the
//! earliest deadline. Under light load frames are rendered alone just in time; under heavy
//! load batches fill up and the GPU's time per frame falls.

use std::time::{Duration, Instant};

/// Frames per second of every session's output.
pub const FRAME: Duration = Duration::from_millis(40);

/// What one tick decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick<J> {
    /// Frames for the GPU now, exactly the chosen profile's size, earliest deadline first.
    pub batch: Vec<J>,
    /// The profile to replay (0 when the batch is empty).
    pub profile: usize,
    /// Frames given up: replace them and count them late.
    pub late: Vec<J>,
    /// When the batch is empty but frames wait: tick again by then (or when a frame comes).
    pub wait_until: Option<Instant>,
}

struct Waiting<J> {
    deadline: Instant,
    /// Submission order breaks deadline ties.
    seq: u64,
    job: J,
}

/// The frames waiting for one GPU.
pub struct Batcher<J> {
    profiles: Vec<usize>,
    waiting: Vec<Waiting<J>>,
    seq: u64,
}

impl<J> Batcher<J> {
    /// Captured batch sizes, e.g. [1, 2, 4, 8, 16]; 1 is added so a lone frame can always run.
    pub fn new(mut profiles: Vec<usize>) -> Self {
        profiles.retain(|&b| b > 0);
        profiles.sort_unstable();
        profiles.dedup();
        if profiles.first() != Some(&1) {
            profiles.insert(0, 1);
        }
        Batcher {
            profiles,
            waiting: Vec::new(),
            seq: 0,
        }
    }

    pub fn profiles(&self) -> &[usize] {
        &self.profiles
    }

    /// A frame ready to render that must be out by `deadline`.
    pub fn push(&mut self, job: J, deadline: Instant) {
        self.seq += 1;
        self.waiting.push(Waiting {
            deadline,
            seq: self.seq,
            job,
        });
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Decides the next batch at `now`, given how long a batch of each profile takes
    /// (`took(profile)`, measured by the worker).
    pub fn tick(&mut self, now: Instant, took: impl Fn(usize) -> Duration) -> Tick<J> {
        let alone = took(1);
        let (keep, late): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| now + alone <= w.deadline);
        self.waiting = keep;
        self.waiting.sort_by_key(|w| (w.deadline, w.seq));
        let late = late.into_iter().map(|w| w.job).collect();
        let Some(earliest) = self.waiting.first().map(|w| w.deadline) else {
            return Tick {
                batch: Vec::new(),
                profile: 0,
                late,
                wait_until: None,
            };
        };
        let n = self.waiting.len();
        // Room for a larger batch: wait for it as long as the earliest frame could still make it
        // in one, with a lone batch's time to spare for the estimate's error.
        if let Some(&larger) = self.profiles.iter().find(|&&b| b > n) {
            let start_by = earliest.checked_sub(took(larger) + alone);
            if let Some(at) = start_by.filter(|&at| now < at) {
                return Tick {
                    batch: Vec::new(),
                    profile: 0,
                    late,
                    wait_until: Some(at),
                };
            }
        }
        let profile = self
            .profiles
            .iter()
            .copied()
            .filter(|&b| b <= n && now + took(b) <= earliest)
            .max()
            .unwrap_or(1);
        let batch = self.waiting.drain(..profile).map(|w| w.job).collect();
        Tick {
            batch,
            profile,
            late,
            wait_until: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A batch takes 5 ms plus 1 ms per frame.
    fn took(b: usize) -> Duration {
        ms(5 + b as u64)
    }

    fn profiles() -> Vec<usize> {
        vec![1, 2, 4, 8, 16]
    }

    #[test]
    fn waits_for_a_fuller_batch_while_the_earliest_frame_can_afford_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(vec![16, 4, 2, 8]);
        assert_eq!(b.profiles(), &[1, 2, 4, 8, 16]);
        let t = b.tick(t0, took);
        assert_eq!((t.profile, t.batch.len(), t.wait_until), (0, 0, None));
        for k in 0..5u32 {
            b.push((k, 0), t0 + ms(200));
        }
        // Five wait; eight would take 13 ms (+6 ms spare): start by 181 ms.
        let t = b.tick(t0 + ms(1), took);
        assert!(t.batch.is_empty() && t.late.is_empty());
        assert_eq!(t.wait_until, Some(t0 + ms(181)));
        // Nobody else came: at 181 the five go as a 4 and then a 1, both in time.
        let t = b.tick(t0 + ms(181), took);
        assert_eq!(
            (t.profile, t.batch.clone()),
            (4, vec![(0, 0), (1, 0), (2, 0), (3, 0)])
        );
        let t = b.tick(t0 + ms(190), took);
        assert_eq!((t.profile, t.batch), (1, vec![(4, 0)]));
        assert!(b.is_empty());
        // A full largest batch goes at once.
        for k in 0..20u32 {
            b.push((k, 1), t0 + ms(400));
        }
        let t = b.tick(t0 + ms(240), took);
        assert_eq!((t.profile, t.wait_until), (16, None));
        // The four left wait for eight until 400 - 13 - 6.
        assert_eq!(b.tick(t0 + ms(261), took).wait_until, Some(t0 + ms(381)));
        assert_eq!(b.tick(t0 + ms(381), took).profile, 4);
    }

    #[test]
    fn frames_that_cannot_make_their_deadline_are_given_up() {
        let t0 = Instant::now();
        let mut b = Batcher::new(profiles());
        b.push(("a", 0), t0 + ms(240));
        b.push(("a", 1), t0 + ms(280));
        // Two would take 7 ms, one more than frame 0 has left: it goes alone.
        let t = b.tick(t0 + ms(234), took);
        assert_eq!(t.batch, vec![("a", 0)]);
        let mut b = Batcher::new(profiles());
        b.push(("a", 0), t0 + ms(240));
        b.push(("a", 1), t0 + ms(280));
        let t = b.tick(t0 + ms(236), took);
        assert_eq!(t.late, vec![("a", 0)]);
        assert!(t.batch.is_empty(), "frame 1 can still wait for company");
        // After a stall (a 2 s GPU hiccup) everything overdue goes at once and the rest runs.
        for i in 2..52u64 {
            b.push(("a", i), t0 + ms(240 + 40 * i));
        }
        let t = b.tick(t0 + ms(2_235), took);
        assert_eq!(t.late.len(), 50);
        // Frame 51 (out at 2280) may wait for company until 2280 - 7 - 6.
        assert_eq!(t.wait_until, Some(t0 + ms(2_267)));
        assert_eq!(b.tick(t0 + ms(2_267), took).batch, vec![("a", 51)]);
    }

    /// Runs sessions at 25 fps, frame deadlines `budget` after they are due, on a GPU that
    /// takes `took`; returns frames rendered per session, late frames, and the batch sizes.
    fn simulate(sessions: u64, budget: u64, ticks: u64) -> (Vec<u32>, usize, Vec<usize>) {
        let t0 = Instant::now();
        let mut b = Batcher::new(profiles());
        let mut served = vec![0u32; sessions as usize];
        let (mut late, mut sizes) = (0, Vec::new());
        let mut next = vec![0u64; sessions as usize];
        let mut busy_until = 0u64;
        for now_ms in 0..ticks {
            for k in 0..sessions {
                // Sessions start 7 ms apart.
                let due = 7 * k + 40 * next[k as usize];
                if now_ms >= due {
                    b.push((k, next[k as usize]), t0 + ms(due + budget));
                    next[k as usize] += 1;
                }
            }
            if now_ms >= busy_until {
                let t = b.tick(t0 + ms(now_ms), took);
                late += t.late.len();
                if t.profile > 0 {
                    sizes.push(t.profile);
                    busy_until = now_ms + took(t.profile).as_millis() as u64;
                    for (k, _) in t.batch {
                        served[k as usize] += 1;
                    }
                }
            } else {
                late += b
                    .tick(t0 + ms(now_ms), |_| ms(busy_until - now_ms) + took(1))
                    .late
                    .len();
            }
        }
        (served, late, sizes)
    }

    #[test]
    fn earliest_deadline_first_starves_nobody_and_batches_grow_with_the_load() {
        // Three sessions, 3 s: every frame rendered, none late, all sessions alike.
        let (served, late, sizes) = simulate(3, 60, 3000);
        assert_eq!(late, 0);
        assert!(served.iter().all(|&n| (73..=76).contains(&n)), "{served:?}");
        let light = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        // Twenty sessions: 500 fps of demand, 16 frames take 21 ms (760 fps): still no frame
        // late, and the batches are large.
        let (served, late, sizes) = simulate(20, 60, 3000);
        assert_eq!(late, 0, "{served:?}");
        assert!(served.iter().all(|&n| (72..=76).contains(&n)), "{served:?}");
        let heavy = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!(
            light <= 4.0 && heavy >= 12.0,
            "batch mean {light:.1} -> {heavy:.1}"
        );
    }

    #[test]
    fn a_tight_deadline_picks_a_smaller_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(profiles());
        for k in 0..8u32 {
            b.push(k, t0 + ms(240));
        }
        // At 229 ms the earliest is due out at 240: 8 frames (13 ms) would miss it, 4 (9 ms) do not.
        let t = b.tick(t0 + ms(229), took);
        assert_eq!(t.profile, 4);
        assert!(t.late.is_empty());
    }
}
