//! Small real base images, made without network: busybox from Debian's `busybox-static` in an
//! OCI layout built with umoci, optionally with an incompressible payload to make copies slow.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::Result;
use super::process::run;

/// An OCI image layout on disk, ready to push.
pub struct BaseImage {
    dir: tempfile::TempDir,
}

const TAG: &str = "base";

impl BaseImage {
    /// A busybox image with a `payload.bin` of `payload_bytes` random bytes.
    pub fn busybox(payload_bytes: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("base-image-").tempdir()?;
        let layout = dir.path().join("layout");
        let bundle = dir.path().join("bundle");
        let image = format!("{}:{TAG}", layout.display());
        run("umoci", &["init", "--layout", path(&layout)])?;
        run("umoci", &["new", "--image", &image])?;
        run(
            "umoci",
            &["unpack", "--rootless", "--image", &image, path(&bundle)],
        )?;
        let bin = bundle.join("rootfs/bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy("/bin/busybox", bin.join("busybox"))?;
        for tool in ["sh", "ls", "cat", "echo", "true"] {
            std::os::unix::fs::symlink("busybox", bin.join(tool))?;
        }
        if payload_bytes > 0 {
            write_noise(&bundle.join("rootfs/payload.bin"), payload_bytes)?;
        }
        run("umoci", &["repack", "--image", &image, path(&bundle)])?;
        run(
            "umoci",
            &[
                "config",
                "--image",
                &image,
                "--config.cmd",
                "/bin/sh",
                "--os",
                "linux",
                "--architecture",
                "amd64",
            ],
        )?;
        std::fs::remove_dir_all(&bundle)?;
        Ok(Self { dir })
    }

    fn layout(&self) -> PathBuf {
        self.dir.path().join("layout")
    }
}

/// Pushes `image` to `docker://{registry}/{repo_tag}` over plain HTTP with skopeo; returns the
/// reference.
pub fn push_image(image: &BaseImage, registry: &str, repo_tag: &str) -> Result<String> {
    push_image_as(image, registry, repo_tag, None)
}

/// [`push_image`] to a registry that wants `user:password`.
pub fn push_image_as(
    image: &BaseImage,
    registry: &str,
    repo_tag: &str,
    credentials: Option<&str>,
) -> Result<String> {
    let reference = format!("{registry}/{repo_tag}");
    let source = format!("oci:{}:{TAG}", image.layout().display());
    let target = format!("docker://{reference}");
    let mut args = vec!["copy", "--quiet", "--dest-tls-verify=false"];
    if let Some(creds) = credentials {
        args.extend(["--dest-creds", creds]);
    }
    args.extend([source.as_str(), target.as_str()]);
    run("skopeo", &args)?;
    Ok(reference)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Incompressible bytes, quickly (xorshift; no need for real randomness).
fn write_noise(file: &Path, bytes: usize) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = [0u8; 8192];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len());
        out.write_all(&block[..n])?;
        left -= n;
    }
    out.flush()?;
    Ok(())
}

/// `skopeo inspect` of a reference over plain HTTP: an independent client's view of an image.
pub fn skopeo_inspect(reference: &str) -> Result<serde_json::Value> {
    skopeo_inspect_as(reference, None)
}

/// [`skopeo_inspect`] with `user:password` for a registry that wants them.
pub fn skopeo_inspect_as(reference: &str, credentials: Option<&str>) -> Result<serde_json::Value> {
    let target = format!("docker://{reference}");
    let mut args = vec!["inspect", "--tls-verify=false"];
    if let Some(creds) = credentials {
        args.extend(["--creds", creds]);
    }
    args.push(&target);
    let out = run("skopeo", &args)?;
    serde_json::from_str(&out).map_err(|e| super::Error::Command {
        command: format!("skopeo inspect {reference}"),
        detail: format!("output is not JSON: {e}"),
    })
}

/// Reads a file out of an image in a registry (plain HTTP): skopeo copies it to an OCI layout,
/// umoci unpacks it.
pub fn read_file_from_image(reference: &str, file: &str) -> Result<Vec<u8>> {
    read_file_from_image_as(reference, file, None)
}

/// [`read_file_from_image`] with `user:password` for a registry that wants them.
pub fn read_file_from_image_as(
    reference: &str,
    file: &str,
    credentials: Option<&str>,
) -> Result<Vec<u8>> {
    let dir = tempfile::Builder::new().prefix("image-read-").tempdir()?;
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    let source = format!("docker://{reference}");
    let target = format!("oci:{}:x", layout.display());
    let mut args = vec!["copy", "--quiet", "--src-tls-verify=false"];
    if let Some(creds) = credentials {
        args.extend(["--src-creds", creds]);
    }
    args.extend([source.as_str(), target.as_str()]);
    run("skopeo", &args)?;
    run(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:x", layout.display()),
            path(&bundle),
        ],
    )?;
    Ok(std::fs::read(
        bundle.join("rootfs").join(file.trim_start_matches('/')),
    )?)
}
