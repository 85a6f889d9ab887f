//! The media path: codecs, decoded frames and audio, the pipeline stage, the per-session worker.

pub mod audio;
pub mod codec;
pub mod frame;
pub mod hold;
pub mod stage;
pub mod wav;
pub mod worker;
pub mod y4m;
