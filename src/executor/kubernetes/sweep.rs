//! The orphan sweep: a builder Job carrying this installation's labels whose build the
//! journal does not know as unfinished (a store that was wiped or restored from an older
//! copy, a build removed while its Job lingered) is deleted once it is older than
//! `orphanGrace`, with its Secret, and counted.

use std::time::Duration;

use image_builder_state::BuildId;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, PropagationPolicy};

use super::{KubernetesExecutor, manifest};

/// Whether the journal has build `id` unfinished (its Job is then in use, or about to be).
pub trait KnownBuilds: Send + Sync {
    /// True when build `id` exists and has not ended.
    fn is_unfinished(&self, id: BuildId) -> bool;
}

/// Deletes this installation's Jobs that no unfinished build knows and that are older than
/// the grace period; returns how many it deleted.
pub async fn sweep_orphans(executor: &KubernetesExecutor, known: &dyn KnownBuilds) -> usize {
    let selector = manifest::selector(&executor.installation, None);
    let jobs = match executor
        .jobs
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(jobs) => jobs.items,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list builder jobs for the orphan sweep");
            return 0;
        }
    };
    let grace = executor.config.orphan_grace;
    let mut deleted = 0;
    for job in jobs {
        if !is_orphan(&job, known, grace) {
            continue;
        }
        let Some(name) = job.metadata.name.clone() else {
            continue;
        };
        let foreground = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        match executor.jobs.delete(&name, &foreground).await {
            Ok(_) => {
                tracing::warn!(job = %name, "deleted a builder job no unfinished build knows");
                executor.delete_secret(&name).await;
                deleted += 1;
            }
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "cannot delete an orphaned builder job");
            }
        }
    }
    deleted
}

/// A Job is an orphan when its build is unknown or has ended, it is older than `grace`, and
/// nobody is deleting it yet.
fn is_orphan(job: &Job, known: &dyn KnownBuilds, grace: Duration) -> bool {
    // Already being deleted: counted once, when the sweep asked.
    if job.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let build = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(manifest::BUILD_LABEL))
        .and_then(|id| id.parse::<BuildId>().ok());
    if build.is_some_and(|id| known.is_unfinished(id)) {
        return false;
    }
    let Some(created) = job.metadata.creation_timestamp.as_ref() else {
        return false;
    };
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
    age.as_secs() >= i64::try_from(grace.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Unfinished(BuildId);

    impl KnownBuilds for Unfinished {
        fn is_unfinished(&self, id: BuildId) -> bool {
            id == self.0
        }
    }

    fn job(build: &str, age: Duration) -> Job {
        let created = k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_secs(i64::try_from(age.as_secs()).unwrap());
        let mut job = Job::default();
        job.metadata.labels = Some(BTreeMap::from([(
            manifest::BUILD_LABEL.to_owned(),
            build.to_owned(),
        )]));
        job.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created),
        );
        job
    }

    #[test]
    fn only_old_jobs_of_builds_not_running_are_orphans() {
        let running = BuildId::new();
        let known = Unfinished(running);
        let grace = Duration::from_secs(600);
        let old = Duration::from_secs(3600);
        assert!(!is_orphan(&job(&running.to_string(), old), &known, grace));
        assert!(is_orphan(
            &job(&BuildId::new().to_string(), old),
            &known,
            grace
        ));
        assert!(is_orphan(&job("not-a-build-id", old), &known, grace));
        assert!(!is_orphan(
            &job(&BuildId::new().to_string(), Duration::from_secs(5)),
            &known,
            grace
        ));
        let mut leaving = job(&BuildId::new().to_string(), old);
        leaving.metadata.deletion_timestamp = leaving.metadata.creation_timestamp.clone();
        assert!(!is_orphan(&leaving, &known, grace), "counted once");
    }
}
