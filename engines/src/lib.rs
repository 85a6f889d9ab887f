//! lipstream-engines: the model side of lipstream — op set and static graph IR, the MuseTalk /
//! SD-VAE / whisper-tiny / MTCNN graphs, weight loaders and the CPU reference executor.
//!
//! Not built yet: the transport path runs with the identity stage until this crate lands. It never
//! depends on `lipstream-gpu` (the GPU crate executes this crate's IR, not the other way round).
#![forbid(unsafe_code)]
