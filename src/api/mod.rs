//! The gRPC edge. Protobuf types stop here: requests are turned into domain types on the way
//! in, results into protobuf on the way out, and errors into `tonic::Status` in one place
//! (`status.rs`).

pub mod access;
mod convert;
pub mod image_builder;
pub mod ops;
pub(crate) mod status;

pub use convert::build_request;
pub use image_builder::ImageBuilderService;
pub use ops::OpsService;
