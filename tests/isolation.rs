//! A hostile Dockerfile takes nothing: its RUN step runs a static program of this test's own
//! (`tests/isolation/attack.c`) that tries what an attacker would, against the real service,
//! buildah and registry, and every attempt must fail; a Dockerfile that needs root inside
//! its image still builds an image whose files have the owners and modes it gave them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::{GitRepo, Ownership, Service, UnpackedImage};

/// Capabilities no RUN step may hold, even in its own user namespace: each would let it act
/// on the host or on other processes beyond its files (capabilities(7) numbers).
const FORBIDDEN_CAPABILITIES: [(u32, &str); 8] = [
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (25, "CAP_SYS_TIME"),
    (27, "CAP_MKNOD"),
];

/// The attack program, built static so that it runs in any image.
fn attack_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, binary) = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("attack");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/isolation/attack.c");
        let out = std::process::Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("run cc");
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, binary)
    });
    binary.clone()
}

/// A repository whose Dockerfile copies the attack program in and runs it with `args`.
fn attack_repo(base: &str, args: &[String]) -> GitRepo {
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {base}\nCOPY attack /attack\nRUN [\"/attack\", {}]\n",
            args.iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )])
    .unwrap();
    let copied = repo.path().join("attack");
    std::fs::copy(attack_binary(), &copied).unwrap();
    std::fs::set_permissions(&copied, std::fs::Permissions::from_mode(0o755)).unwrap();
    repo.commit(&[], "the attack program").unwrap();
    repo
}

/// The port of `http://host:port`.
fn port(url: &str) -> u16 {
    url.trim_start_matches("http://")
        .split(['/', ':'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Every IPv4 address of this machine but loopback's.
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// What the attack program printed: its verdicts, checked one by one.
struct Verdicts<'a> {
    log: &'a str,
}

impl<'a> Verdicts<'a> {
    fn lines(&self) -> impl Iterator<Item = &'a str> {
        self.log
            .lines()
            .filter_map(|l| l.strip_prefix("ATTACK "))
            .filter(|l| *l != "done")
    }

    /// Asserts that the program ran to its end, that nothing it tried worked, and that it
    /// tried each of `attempts` (line prefixes).
    fn all_blocked(&self, attempts: &[String]) {
        assert!(
            self.log.contains("ATTACK done\n"),
            "the attack did not run to its end:\n{}",
            self.log
        );
        let open: Vec<_> = self.lines().filter(|l| l.contains(": OPEN")).collect();
        assert!(open.is_empty(), "a RUN step got through: {open:#?}");
        for attempt in attempts {
            assert!(
                self.lines()
                    .any(|l| l.starts_with(attempt.as_str()) && l.contains(": blocked")),
                "{attempt:?} was not tried:\n{}",
                self.log
            );
        }
    }

    /// The value of `REPORT <name> <value>`.
    fn report(&self, name: &str) -> &'a str {
        let prefix = format!("REPORT {name} ");
        self.log
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {name} reported:\n{}", self.log))
            .trim()
    }

    /// Asserts that root in RUN is an unprivileged id on the host and that RUN holds none
    /// of [`FORBIDDEN_CAPABILITIES`].
    fn unprivileged(&self) {
        let map: Vec<u64> = self
            .report("uid_map")
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(map[0], 0, "uid_map {map:?}");
        assert_ne!(map[1], 0, "root in RUN is the host's root: uid_map {map:?}");
        assert!(
            map[2] < u64::from(u32::MAX),
            "uid_map {map:?} maps every id"
        );
        for set in ["CapEff", "CapBnd"] {
            let bits = u64::from_str_radix(self.report(set), 16).unwrap();
            for (bit, name) in FORBIDDEN_CAPABILITIES {
                assert_eq!(bits & (1 << bit), 0, "{set} {bits:#x} holds {name}");
            }
        }
    }
}

async fn build_and_log(
    service: &Service,
    request: pb::BuildRequest,
) -> (pb::BuildResponse, String) {
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, request).await.unwrap();
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    (responses.last().unwrap().clone(), log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_run_step_cannot_escape_read_secrets_devices_or_reach_the_service() {
    let shared = shared();
    let service = service("isolation-local");
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("host-secret");
    std::fs::write(&secret, "host-secret-8d1f\n").unwrap();
    // Readable by everyone on the host: only the container's walls keep it.
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = service.data_dir();
    let secrets = [
        secret.display().to_string(),
        data.join("store/db").display().to_string(),
        data.join("buildah/registries.conf").display().to_string(),
    ];
    let ports = [
        port(&service.grpc_url()),
        port(&service.metrics_url()),
        port(&format!("http://{}", shared.registry.addr())),
    ];
    // The step's own loopback, slirp4netns's alias of the host's (10.0.2.2), and every other
    // address of the host.
    let mut hosts = vec!["127.0.0.1".to_owned(), "10.0.2.2".to_owned()];
    hosts.extend(host_addresses());
    let targets: Vec<String> = hosts
        .iter()
        .flat_map(|h| ports.iter().map(move |p| format!("{h}:{p}")))
        .collect();
    let mut args = secrets.to_vec();
    args.push("--".into());
    args.extend(targets.iter().cloned());
    let repo = attack_repo(&shared.base, &args);

    let (last, log) = build_and_log(&service, head_build(&repo.uri())).await;
    assert_eq!(status(&last), pb::BuildStatus::DoneSuccess, "{log}");
    let verdicts = Verdicts { log: &log };
    let mut attempts: Vec<String> = [
        "chroot-escape",
        "credentials-in-dev-shm",
        "service-account-token",
        "read-device",
        "mknod-device",
        "mount-device",
        "mount-proc",
        "see-processes",
        "write /proc/sys/vm/drop_caches",
        "write /proc/sys/kernel/core_pattern",
        "write /sys/kernel/mm/transparent_hugepage/enabled",
    ]
    .map(str::to_owned)
    .to_vec();
    attempts.extend(secrets.iter().map(|s| format!("read-secret {s}")));
    attempts.extend(targets.iter().map(|t| format!("connect {t}")));
    verdicts.all_blocked(&attempts);
    verdicts.unprivileged();
    // The step saw its own few processes, not the host's.
    let seen: usize = verdicts.report("processes").parse().unwrap();
    assert!(seen < 10, "{seen} processes visible to RUN");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_build_that_needs_root_inside_gets_the_owners_and_modes_it_set() {
    let shared = shared();
    let service = service("isolation-root-inside");
    let run = [
        "echo 'root:x:0:0::/root:/bin/sh' > /etc/passwd",
        "echo 'alice:x:1001:1001::/home/alice:/bin/sh' >> /etc/passwd",
        "echo 'bob:x:1002:1002::/:/bin/sh' >> /etc/passwd",
        "printf 'root:x:0:\\nalice:x:1001:\\nbob:x:1002:\\nstaff:x:50:bob\\n' > /etc/group",
        "mkdir -p /home/alice /srv/shared /usr/local/bin",
        "chown 1001:1001 /home/alice && chmod 0750 /home/alice",
        "su alice -c 'echo mine > /home/alice/made-by-alice'",
        "echo shared > /srv/shared/bobs && chown 1002:50 /srv/shared/bobs && chmod 0640 /srv/shared/bobs",
        "cp /bin/busybox /usr/local/bin/suid-tool && chmod 4755 /usr/local/bin/suid-tool",
        "touch /srv/nobodys && chown 65534:65534 /srv/nobodys && chmod 2600 /srv/nobodys",
    ]
    .join(" && ");
    let repo =
        GitRepo::new(&[("Dockerfile", &format!("FROM {}\nRUN {run}\n", shared.base))]).unwrap();
    let (last, log) = build_and_log(&service, head_build(&repo.uri())).await;
    assert_eq!(status(&last), pb::BuildStatus::DoneSuccess, "{log}");

    let image = UnpackedImage::fetch(&last.base_ref, None, Ownership::AsInTheImage).unwrap();
    let expected = [
        ("/home/alice", 1001, 1001, 0o40750),
        ("/home/alice/made-by-alice", 1001, 1001, 0o100644),
        ("/srv/shared/bobs", 1002, 50, 0o100640),
        ("/usr/local/bin/suid-tool", 0, 0, 0o104755),
        ("/srv/nobodys", 65534, 65534, 0o102600),
        ("/etc/passwd", 0, 0, 0o100644),
    ];
    for (file, uid, gid, mode) in expected {
        let meta = std::fs::symlink_metadata(image.path(file))
            .unwrap_or_else(|e| panic!("{file}: {e}\n{log}"));
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode()),
            (uid, gid, mode),
            "{file}: owner, group and mode (octal {:o})",
            meta.mode()
        );
    }
}
