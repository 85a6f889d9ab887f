//! lipstream: a real-time streaming lip-sync server.
//!
//! The library holds everything the `lipstream` binary runs (HTTP signalling, the str0m WebRTC
//! driver, the media path) plus the WebRTC test client the tests and `lipstream bench` use.
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod config;
pub mod engine;
pub mod http;
pub mod lipsync;
pub mod media;
pub mod metrics;
pub mod placement;
pub mod pull;
pub mod registry;
pub mod rtc;
pub mod scheduler;
pub mod sdp;
pub mod server;
