//! Code generated from `proto/` at build time. Only `api/` (and clients such as tests) use it.

/// gitpod's content-service initializers (`initializer.proto`).
#[allow(missing_docs, clippy::all)]
pub mod contentservice {
    tonic::include_proto!("contentservice");
}

/// mk3's `builder` package (`imgbuilder.proto`).
#[allow(missing_docs, clippy::all)]
pub mod builder {
    tonic::include_proto!("builder");
}

/// image-builder's operations API (`ops.proto`).
#[allow(missing_docs, clippy::all)]
pub mod ops {
    tonic::include_proto!("imagebuilder.ops.v1");
}

/// The encoded descriptors of every file in `proto/` and what they import, for server
/// reflection (`grpcurl list` without the proto files).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
