//! What each container of a builder pod runs (see `manifest.rs` for the pod): shell scripts
//! that take everything from `IB_*` variables, always quoted, and hand over through the
//! hand-off volume's files (`clone.status`, `fetch.status`, `build.status`, `push.status` and
//! their logs).

use crate::executor::BASE_IMAGES_AWK;

/// The clone step (an init container, with the git credentials alone, into git's
/// environment only): clones the context into the shared checkout. Its output and exit
/// status go to the hand-off, for the builder to put in the build's log; it always exits 0
/// so that the builder can. Everything it needs comes from `IB_*` variables, always quoted.
pub(super) const CLONE_SCRIPT: &str = r#"set -u
exec >/handoff/clone.log 2>&1
(
set -e
export GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false LC_ALL=C
if [ -s /var/run/image-builder/git-basic ]; then
  GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraHeader
  GIT_CONFIG_VALUE_0="Authorization: Basic $(cat /var/run/image-builder/git-basic)"
  export GIT_CONFIG_COUNT GIT_CONFIG_KEY_0 GIT_CONFIG_VALUE_0
fi
echo "cloning $IB_REMOTE"
case "$IB_MODE" in
  head) git clone --quiet --depth 1 -- "$IB_REMOTE" /workspace/src ;;
  branch) git clone --quiet --depth 1 --branch "$IB_TARGET" -- "$IB_REMOTE" /workspace/src ;;
  commit) git init --quiet /workspace/src
          # That commit alone where the server serves commits by id, else the whole history.
          if git -C /workspace/src fetch --quiet --no-tags --depth 1 -- "$IB_REMOTE" "$IB_TARGET"; then
            git -C /workspace/src checkout --quiet --detach FETCH_HEAD
            rm -f /workspace/src/.git/FETCH_HEAD
          else
            echo "the server does not serve that commit alone; fetching the whole repository"
            git -C /workspace/src fetch --quiet --no-tags -- "$IB_REMOTE" "+refs/heads/*:refs/remotes/origin/*"
            git -C /workspace/src checkout --quiet --detach "$IB_TARGET"
          fi ;;
esac
)
echo "$?" >/handoff/clone.status
exit 0
"#;

/// The build step (the builder container, with no credential at all): waits for the registry
/// step's pulls, puts the clone's and their output in the log, checks that the Dockerfile and
/// context stay inside the checkout, builds with buildah, hands the image to the registry step
/// through buildah's storage, and puts the push's output and status in the log. buildah runs as root of a user namespace
/// nested in the pod's (mapped before it starts: no privilege is gained across exec), holding
/// the capabilities it needs over the pod's ids only; RUN steps are runc containers there
/// (pivot_root into the image; pid, mount, ipc and uts namespaces of their own) on the pod's
/// network. Base images and cached steps are in the storage already (the registry step put
/// them there); one missing is pulled without credentials. With a layer cache, every step's
/// result is kept (`--layers`) for the registry step to write to the cache; a forced rebuild
/// (`IB_FORCE`) finds nothing of the cache in the storage (none was pulled), so every step
/// runs.
pub(super) const BUILD_SCRIPT: &str = r#"set -eu
# Whatever ends this script, the registry step learns how (it waits for this file).
trap 'code=$?; [ -e /handoff/build.status ] || echo "$code" >/handoff/build.status' EXIT
export LC_ALL=C
cat /handoff/clone.log
cloned=$(cat /handoff/clone.status 2>/dev/null || echo 1)
[ "$cloned" = 0 ] || exit "$cloned"
until [ -e /handoff/fetch.status ]; do sleep 0.2; done
cat /handoff/fetch.log
trust_insecure_registries
dockerfile=$(inside Dockerfile "${IB_DOCKERFILE:-Dockerfile}")
context=$(inside context "${IB_CONTEXT:-.}")
layers=--layers
if [ -z "$IB_CACHE" ]; then
  layers=--layers=false
  echo "building $IB_TAG with buildah"
elif [ -n "$IB_FORCE" ]; then
  echo "building $IB_TAG with buildah; force_rebuild is set: every step runs again (the layer cache $IB_CACHE is written, not read)"
else
  echo "building $IB_TAG with buildah; steps found in the layer cache $IB_CACHE are not run again"
fi
nested buildah bud --isolation oci --network host --pull=false "$layers" --format docker \
  -f "$dockerfile" -t "$IB_TAG" "$context"
echo "pushing $IB_TAG"
echo 0 >/handoff/build.status
until [ -e /handoff/push.status ]; do sleep 0.2; done
cat /handoff/push.log
exit "$(cat /handoff/push.status)"
"#;

/// What the builder and registry steps share, put before each one's script: `nested` runs a
/// command as root of a user namespace nested in the pod's, mapped over all of the pod's
/// 65536 ids before it starts (no privilege is gained across exec); `trust_insecure_registries`
/// lets buildah speak plain HTTP to the hosts of `IB_INSECURE`; `inside WHAT PATH` prints
/// PATH resolved in the checkout, or fails saying it leaves it; `base_images DOCKERFILE`
/// lists the images it names; `RUN_NOTHING` makes `buildah bud` stop at the first step it
/// would have to run (its runtime is `/bin/false`), for the step that holds credentials.
pub(super) fn buildah_step_prelude() -> String {
    format!(
        r#"nested() {{
  unshare --map-users=0,0,65536 --map-groups=0,0,65536 --setuid 0 --setgid 0 \
    --mount --propagation private -- "$@"
}}
trust_insecure_registries() {{
  for host in $IB_INSECURE; do
    mkdir -p /etc/containers/registries.conf.d
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$host" >> /etc/containers/registries.conf.d/image-builder.conf
  done
}}
inside() {{
  root=$(realpath /workspace/src)
  real=$(realpath -e "/workspace/src/$2" 2>/dev/null) || {{ echo "the $1 $2 does not exist in the repository" >&2; exit 2; }}
  case "$real/" in "$root"/*) echo "$real" ;; *) echo "the $1 $2 leaves the repository" >&2; exit 2 ;; esac
}}
base_images() {{
  awk '{BASE_IMAGES_AWK}' "$1"
}}
RUN_NOTHING="--isolation oci --runtime /bin/false --network host"
"#
    )
}

/// The registry step (beside the builder, with the registry credentials alone; nothing of
/// the Dockerfile runs here: every `buildah bud` of it has `/bin/false` for its runtime, so it
/// stops at the first step that would have to run). Before the build: pulls the images the
/// Dockerfile names ([`BASE_IMAGES_AWK`]) and, unless the build is forced, the steps the layer
/// cache holds, up to the first that must run, into the shared storage where the builder finds
/// them; its output and end go to the hand-off (`fetch.log`, `fetch.status`), for the builder
/// to start and put them in the log. A pull that failed is left to the builder, which tries it
/// without credentials and says why it failed. After the build: writes every step to the layer
/// cache (each is found in the storage, none runs) and pushes the image, as root of its own
/// nested user namespace (the layers' files belong to the pod's ids); that output and status
/// go to the hand-off too.
pub(super) const REGISTRY_SCRIPT: &str = r#"set -u
export LC_ALL=C REGISTRY_AUTH_FILE=/var/run/image-builder/auth.json
trust_insecure_registries
fetch() {
  base_images "$dockerfile" | while IFS= read -r image; do
    echo "pulling base image $image"
    nested buildah pull --policy always "$image" >/dev/null ||
      echo "could not pull $image; the build pulls what it lacks without credentials"
  done
  if [ -n "$IB_CACHE" ] && [ -z "$IB_FORCE" ]; then
    nested buildah bud $RUN_NOTHING --pull=false --layers --cache-from "$IB_CACHE" \
      --format docker -f "$dockerfile" "$context" >/handoff/prime.log 2>&1
    echo "took $(grep -c 'Cache pulled from remote' /handoff/prime.log) steps from the layer cache $IB_CACHE"
  fi
}
# A failed clone or paths that leave the checkout: nothing to fetch, build or push; the
# builder says why.
if [ "$(cat /handoff/clone.status 2>/dev/null)" = 0 ] &&
   dockerfile=$(inside Dockerfile "${IB_DOCKERFILE:-Dockerfile}" 2>/dev/null) &&
   context=$(inside context "${IB_CONTEXT:-.}" 2>/dev/null); then
  fetch >/handoff/fetch.log 2>&1
else
  : >/handoff/fetch.log
  echo 0 >/handoff/fetch.status
  exit 0
fi
echo 0 >/handoff/fetch.status
until [ -e /handoff/build.status ]; do sleep 0.2; done
[ "$(cat /handoff/build.status)" = 0 ] || exit 0
exec >/handoff/push.log 2>&1
if [ -n "$IB_CACHE" ]; then
  if nested buildah bud $RUN_NOTHING --pull=false --layers --cache-to "$IB_CACHE" \
       --format docker -f "$dockerfile" "$context" >/handoff/cache.log 2>&1; then
    echo "wrote $(grep -c 'Pushing cache' /handoff/cache.log) steps to the layer cache $IB_CACHE"
  else
    echo "the layer cache $IB_CACHE was not written (later builds run these steps again):"
    tail -n 3 /handoff/cache.log
  fi
fi
# Pushing the same content again is harmless; a registry answering "blob unknown" to a
# manifest while another builder pushes the same layer to the same repository is not final.
code=1
for attempt in 1 2 3 4; do
  if nested buildah push "$IB_TAG" "docker://$IB_TAG"; then
    code=0
    break
  fi
  [ "$attempt" = 4 ] || { echo "push attempt $attempt failed; trying again"; sleep "$attempt"; }
done
echo "$code" >/handoff/push.status
exit "$code"
"#;
