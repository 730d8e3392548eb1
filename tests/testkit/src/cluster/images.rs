//! Images the node runs without any registry: a pause image (containerd's sandbox image) and
//! busybox, both made with umoci from Debian's `busybox-static` and imported into the node's
//! containerd as docker archives.

use std::path::{Path, PathBuf};

use anyhow::Result;
use image_builder_scenario::fixtures::run;

use super::{BUSYBOX_IMAGE, Cluster, PAUSE_IMAGE};

/// The node's images as docker archives in a temporary directory.
pub struct NodeImages {
    dir: tempfile::TempDir,
}

impl NodeImages {
    /// Makes the pause and busybox images.
    pub fn get() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("node-images-").tempdir()?;
        let images = Self { dir };
        images.make(
            "pause",
            PAUSE_IMAGE,
            &["/bin/busybox", "sleep", "2147483647"],
        )?;
        images.make("busybox", BUSYBOX_IMAGE, &["/bin/sh"])?;
        Ok(images)
    }

    /// Imports both into the node's containerd.
    pub fn import(&self, cluster: &Cluster) -> Result<()> {
        for name in ["pause", "busybox"] {
            cluster.import_image(&self.archive(name))?;
        }
        Ok(())
    }

    fn archive(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.tar"))
    }

    fn make(&self, name: &str, reference: &str, entrypoint: &[&str]) -> Result<()> {
        let layout = self.dir.path().join(format!("{name}-layout"));
        let bundle = self.dir.path().join(format!("{name}-bundle"));
        let image = format!("{}:latest", layout.display());
        run("umoci", &["init", "--layout", &text(&layout)])?;
        run("umoci", &["new", "--image", &image])?;
        run(
            "umoci",
            &["unpack", "--rootless", "--image", &image, &text(&bundle)],
        )?;
        let rootfs = bundle.join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy("/bin/busybox", bin.join("busybox"))?;
        for tool in [
            "sh", "echo", "sleep", "cat", "ls", "true", "false", "env", "wc",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(tool))?;
        }
        std::fs::create_dir_all(rootfs.join("etc"))?;
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
        run("umoci", &["repack", "--image", &image, &text(&bundle)])?;
        let mut config = vec!["config", "--image", &image, "--os", "linux"];
        config.extend(["--architecture", "amd64"]);
        let entry = entrypoint
            .iter()
            .map(|e| format!("--config.entrypoint={e}"))
            .collect::<Vec<_>>();
        config.extend(entry.iter().map(String::as_str));
        run("umoci", &config)?;
        let archive = format!(
            "docker-archive:{}:{reference}",
            self.archive(name).display()
        );
        run(
            "skopeo",
            &["copy", "--quiet", &format!("oci:{image}"), &archive],
        )?;
        Ok(())
    }
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
