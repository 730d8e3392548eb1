//! image-builder: a durable, mk3-compatible workspace image builder.
//!
//! The service speaks gitpod's `builder.ImageBuilder` protocol and runs every build as a
//! journaled state machine (see the `image-builder-state` crate). `ARCHITECTURE.md` is the map.

pub mod api;
pub mod config;
pub mod context;
pub mod credentials;
pub mod executor;
pub mod orchestrator;
pub mod process;
pub mod refs;
pub mod registry;
pub mod reload;
pub mod server;
pub mod steps;
pub mod telemetry;
pub mod tls;

pub use image_builder_proto::{self as proto, client};
