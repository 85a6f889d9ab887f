//! Audio features for the lip-sync stage: Whisper's log-mel and MuseTalk's per-frame audio prompt.

pub mod mel;
pub mod prompt;
pub mod stream;
