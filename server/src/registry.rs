//! Which sessions and viewers exist: the HTTP side's view, shared with the driver.
//!
//! The lock is held only for map updates, never across I/O.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Instant;

/// A published session's id (the `{id}` of `/whip/{id}`, the `session=` of `/whep`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionId(pub String);

/// A WHEP viewer's id (the `{id}` of `/whep/{id}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ViewerId(pub String);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ViewerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 128 random bits as hex: resource URLs must not be guessable, since they allow DELETE.
fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Why a new session or viewer was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    SessionLimit { max: usize },
    ViewerLimit { max: usize },
    NoSuchSession,
}

struct SessionEntry {
    viewers: HashSet<ViewerId>,
    opened: Instant,
}

/// One line of the session listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionListing {
    pub id: String,
    pub viewers: usize,
    pub age_s: f64,
}

/// The set of live sessions and viewers, with the limits.
pub struct Registry {
    sessions: HashMap<SessionId, SessionEntry>,
    viewers: HashMap<ViewerId, SessionId>,
    max_sessions: usize,
    max_viewers_per_session: usize,
}

impl Registry {
    pub fn new(max_sessions: usize, max_viewers_per_session: usize) -> Self {
        Registry {
            sessions: HashMap::new(),
            viewers: HashMap::new(),
            max_sessions,
            max_viewers_per_session,
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn viewer_count(&self) -> usize {
        self.viewers.len()
    }

    /// Open sessions, oldest first.
    pub fn listing(&self) -> Vec<SessionListing> {
        let mut v: Vec<(&SessionId, &SessionEntry)> = self.sessions.iter().collect();
        v.sort_by_key(|(_, e)| e.opened);
        v.into_iter()
            .map(|(id, e)| SessionListing {
                id: id.0.clone(),
                viewers: e.viewers.len(),
                age_s: e.opened.elapsed().as_secs_f64(),
            })
            .collect()
    }

    /// Whether one more session may open (else the limit it would pass).
    pub fn session_room(&self) -> Result<(), Refusal> {
        if self.sessions.len() >= self.max_sessions {
            return Err(Refusal::SessionLimit {
                max: self.max_sessions,
            });
        }
        Ok(())
    }

    /// Reserves a new session id, or refuses at the limit.
    pub fn open_session(&mut self) -> Result<SessionId, Refusal> {
        self.session_room()?;
        let id = SessionId(random_id());
        self.sessions.insert(
            id.clone(),
            SessionEntry {
                viewers: HashSet::new(),
                opened: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Reserves a viewer of `session`.
    pub fn open_viewer(&mut self, session: &SessionId) -> Result<ViewerId, Refusal> {
        let entry = self
            .sessions
            .get_mut(session)
            .ok_or(Refusal::NoSuchSession)?;
        if entry.viewers.len() >= self.max_viewers_per_session {
            return Err(Refusal::ViewerLimit {
                max: self.max_viewers_per_session,
            });
        }
        let id = ViewerId(random_id());
        entry.viewers.insert(id.clone());
        self.viewers.insert(id.clone(), session.clone());
        Ok(id)
    }

    /// Forgets a session and its viewers; returns the viewers, or `None` if it was unknown.
    pub fn close_session(&mut self, id: &SessionId) -> Option<Vec<ViewerId>> {
        let entry = self.sessions.remove(id)?;
        for v in &entry.viewers {
            self.viewers.remove(v);
        }
        Some(entry.viewers.into_iter().collect())
    }

    /// Forgets a viewer; returns its session, or `None` if it was unknown.
    pub fn close_viewer(&mut self, id: &ViewerId) -> Option<SessionId> {
        let session = self.viewers.remove(id)?;
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.viewers.remove(id);
        }
        Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cleanup() {
        let mut r = Registry::new(2, 1);
        let a = r.open_session().unwrap();
        let b = r.open_session().unwrap();
        assert_ne!(a, b);
        assert_eq!(r.open_session(), Err(Refusal::SessionLimit { max: 2 }));
        let v = r.open_viewer(&a).unwrap();
        assert_eq!(r.open_viewer(&a), Err(Refusal::ViewerLimit { max: 1 }));
        assert_eq!(
            r.open_viewer(&SessionId("nope".into())),
            Err(Refusal::NoSuchSession)
        );
        assert_eq!(r.close_session(&a), Some(vec![v.clone()]));
        assert_eq!(
            r.close_viewer(&v),
            None,
            "closing a session closes its viewers"
        );
        assert_eq!(r.close_session(&a), None);
        assert_eq!((r.session_count(), r.viewer_count()), (1, 0));
        r.open_session().unwrap();
    }
}
