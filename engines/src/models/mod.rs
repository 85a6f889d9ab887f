//! Model graphs whose structure and weight names mirror the upstream checkpoints.

pub mod blocks;
pub mod config;
pub mod mtcnn;
pub mod musetalk;
pub mod unet;
pub mod vae;
pub mod whisper;
