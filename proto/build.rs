//! Generates the gRPC code for `proto/` at build time, with a vendored protoc unless `PROTOC`
//! names one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    for file in ["imgbuilder.proto", "ops.proto", "initializer.proto"] {
        println!("cargo:rerun-if-changed={file}");
    }
    // The descriptors of every message and service, for server reflection.
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .build_server(true)
        .build_client(true)
        // Prost's codec with a smaller yield threshold (see `proto::codec`).
        .codec_path("crate::codec::StreamCodec")
        .compile_protos(&["imgbuilder.proto", "ops.proto"], &["."])?;
    Ok(())
}
