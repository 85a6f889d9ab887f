//! Where a new session goes when the host has several GPUs: the one with the most headroom.
//!
//! Pure and sans-IO: each GPU's renderer reports its load (`GpuLoad`, measured over its last
//! window of batches: the share of the GPU its frames take in its cheapest batches), and
//! `choose` ranks them. A GPU already giving up frames is full; among the others the one whose
//! load after one more session would be lowest wins, judged by its own measured cost per
//! session (GPUs of different speed fill in proportion); loads within a few percent count as
//! equal and the fewer sessions win, which also spreads a burst of joins that arrives before any
//! batch has been measured. `GpuLoad::room` says whether a GPU can take one more session at
//! all (`serve --max-gpu-load`).

/// Late frames above this share mark a GPU as full.
pub const FULL_LATE: f64 = 0.01;
/// Projected occupancies closer than this are equal.
const SAME_OCCUPANCY: f64 = 0.05;

/// One GPU's load as its renderer measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuLoad {
    /// Share of the GPU its frames need in its cheapest batches (above 1: more than it has).
    /// Not the share of time it is busy: below full load the renderer fills the GPU with small
    /// batches.
    pub load: f64,
    /// Share of frames given up or not back in time.
    pub late: f64,
    /// Sessions placed on it now.
    pub sessions: usize,
}

impl GpuLoad {
    fn full(&self) -> bool {
        self.late > FULL_LATE
    }

    /// Occupancy once one more session of this GPU's average cost is added.
    fn projected(&self) -> f64 {
        if self.sessions == 0 {
            self.load
        } else {
            self.load * (self.sessions + 1) as f64 / self.sessions as f64
        }
    }

    /// Whether this GPU has room for one more session within `max` of its capacity: it gives
    /// up no frames (beyond `FULL_LATE`) and its load with one more session stays within
    /// `max`. Else why not, in words.
    ///
    /// Sessions placed since the last window was measured count at the average cost of the
    /// measured ones, and before any window all count as free: a burst of joins into an idle
    /// server is only judged once its frames have run for a second.
    pub fn room(&self, max: f64) -> Result<(), String> {
        if self.full() {
            return Err(format!(
                "gives up {:.1} % of its frames with {} sessions",
                self.late * 100.0,
                self.sessions
            ));
        }
        let next = self.projected();
        if next > max {
            return Err(format!(
                "at {:.2} of its capacity with {} sessions, {next:.2} with one more (limit {max:.2})",
                self.load, self.sessions
            ));
        }
        Ok(())
    }

    /// Whether a new session is better placed here than on `other`.
    fn better_than(&self, other: &GpuLoad) -> bool {
        if self.full() != other.full() {
            return !self.full();
        }
        if self.full() && (self.late - other.late).abs() > f64::EPSILON {
            return self.late < other.late;
        }
        let (a, b) = (self.projected(), other.projected());
        if (a - b).abs() > SAME_OCCUPANCY {
            return a < b;
        }
        self.sessions < other.sessions
    }
}

/// The index of the GPU a new session should go to (`None` with no GPU). Ties keep the lower
/// index.
pub fn choose(loads: &[GpuLoad]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, load) in loads.iter().enumerate() {
        if best.is_none_or(|b| load.better_than(&loads[b])) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(load: f64, late: f64, sessions: usize) -> GpuLoad {
        GpuLoad {
            load,
            late,
            sessions,
        }
    }

    /// Places `n` sessions one by one on simulated GPUs whose frames cost `cost[g]` of the GPU
    /// per session, each measured after every placement; returns the sessions per GPU.
    fn place(cost: &[f64], n: usize) -> Vec<usize> {
        let mut sessions = vec![0; cost.len()];
        for _ in 0..n {
            let loads: Vec<GpuLoad> = sessions
                .iter()
                .zip(cost)
                .map(|(&s, &c)| {
                    let demand = s as f64 * c;
                    // Past full occupancy the GPU gives up what it cannot render.
                    load(demand, ((demand - 1.0) / demand.max(1e-9)).max(0.0), s)
                })
                .collect();
            let g = choose(&loads).unwrap();
            sessions[g] += 1;
        }
        sessions
    }

    #[test]
    fn room_for_a_session_means_within_the_limit_with_it_and_no_frames_given_up() {
        // 23 sessions at 0.90: 0.94 with one more.
        assert_eq!(load(0.90, 0.0, 23).room(0.95), Ok(()));
        let why = load(0.90, 0.0, 23).room(0.92).unwrap_err();
        assert_eq!(
            why,
            "at 0.90 of its capacity with 23 sessions, 0.94 with one more (limit 0.92)"
        );
        // Giving up frames: full, whatever its load reads.
        let why = load(0.5, 0.02, 10).room(0.95).unwrap_err();
        assert_eq!(why, "gives up 2.0 % of its frames with 10 sessions");
        // An idle GPU has room.
        assert_eq!(load(0.0, 0.0, 0).room(0.5), Ok(()));
    }

    #[test]
    fn a_burst_of_joins_spreads_before_anything_is_measured() {
        let mut sessions = [0usize; 2];
        for _ in 0..8 {
            let loads: Vec<GpuLoad> = sessions.iter().map(|&s| load(0.0, 0.0, s)).collect();
            sessions[choose(&loads).unwrap()] += 1;
        }
        assert_eq!(sessions, [4, 4]);
    }

    #[test]
    fn a_gpu_giving_up_frames_is_avoided_whatever_its_session_count() {
        let loads = [load(0.95, 0.04, 3), load(0.90, 0.0, 9)];
        assert_eq!(choose(&loads), Some(1));
        // Both full: the one losing fewer frames.
        let loads = [load(1.0, 0.20, 3), load(1.0, 0.05, 9)];
        assert_eq!(choose(&loads), Some(1));
    }

    #[test]
    fn occupancy_outranks_session_count() {
        // Four heavy sessions at 80 % against six light ones at 30 %.
        let loads = [load(0.80, 0.0, 4), load(0.30, 0.0, 6)];
        assert_eq!(choose(&loads), Some(1));
        // Within a few percent: the fewer sessions.
        let loads = [load(0.50, 0.0, 6), load(0.52, 0.0, 5)];
        assert_eq!(choose(&loads), Some(1));
    }

    #[test]
    fn equal_gpus_share_evenly_and_a_faster_one_takes_more() {
        assert_eq!(place(&[0.08, 0.08], 24), vec![12, 12]);
        // Twice as fast: about twice the sessions, and neither overloaded before the other.
        let s = place(&[0.08, 0.04], 24);
        assert_eq!(s.iter().sum::<usize>(), 24);
        assert!(
            (15..=17).contains(&s[1]),
            "the faster GPU takes about two thirds: {s:?}"
        );
    }

    #[test]
    fn no_gpu_no_choice() {
        assert_eq!(choose(&[]), None);
    }
}
