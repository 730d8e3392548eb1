//! Steps that control or look inside the service process: restarts, kills, failpoints, metrics, its log, its store.

use super::*;

impl Playback {
    /// Plays one of this module's steps.
    pub(super) async fn process_step(&mut self, step: &Step) -> Check {
        match step {
            Step::Restart { failpoints } => {
                self.service()?.stop();
                self.start_again(failpoints)
            }
            Step::Kill { failpoints } => {
                self.service()?.kill();
                self.start_again(failpoints)
            }
            Step::WaitForPoint { point } => {
                let needle = format!("failpoint reached failpoint={point}");
                let service = self.service()?;
                for _ in 0..1200 {
                    if service.log().contains(&needle) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(format!(
                    "the service did not reach failpoint {point} within 60 s (is it configured with pause?)"
                ))
            }
            Step::ExpectMetric { name, value } => {
                let url = self.service()?.metrics_url();
                let text = reqwest::get(&url)
                    .await
                    .map_err(|e| format!("{url}: {e}"))?
                    .text()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let got = text
                    .lines()
                    .find(|l| l.starts_with(name.as_str()) && l[name.len()..].starts_with(' '))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok());
                ensure!(
                    got == Some(*value),
                    "metric {name} is {got:?}, expected {value}"
                );
                Ok(())
            }
            Step::ExpectServiceLog { contains } => {
                let log = self.service()?.log();
                ensure!(
                    log.contains(contains.as_str()),
                    "the service log lacks {contains:?}"
                );
                Ok(())
            }
            Step::ExpectConcurrency { at_most, at_least } => {
                self.expect_concurrency(*at_most, at_least.unwrap_or(1))
                    .await
            }
            Step::ExpectNoLeak { values } => self.expect_no_leak(values).await,
            other => Err(format!("{} is not played here", other.kind())),
        }
    }

    /// Starts the (stopped) service again with its environment and these failpoints.
    fn start_again(&mut self, failpoints: &str) -> Check {
        let url = self.service()?.start(failpoints)?;
        self.env.grpc_url = url;
        Ok(())
    }

    pub(super) fn service(&mut self) -> Result<&mut dyn ServiceProcess, String> {
        match self.env.service.as_mut() {
            Some(service) => Ok(service.as_mut()),
            None => Err("no service process to control".to_owned()),
        }
    }

    pub(super) async fn expect_no_leak(&mut self, values: &[String]) -> Check {
        let mut seen = String::new();
        let names: Vec<String> = self.builds.keys().cloned().collect();
        for name in names {
            if self.build_id(&name).await.is_ok() {
                seen.push_str(&String::from_utf8_lossy(&self.full_log(&name).await?));
            }
            let t = self.tracked(&name)?;
            let s = t.state.lock();
            seen.push_str(&format!("{:?}{:?}", s.responses, s.error));
        }
        let service = self.service()?;
        let metrics = reqwest::get(service.metrics_url())
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        seen.push_str(&metrics);
        seen.push_str(&service.log());
        let data_dir = service.data_dir();
        for value in values {
            ensure!(
                !seen.contains(value.as_str()),
                "a secret value is in a log, an answer or the metrics"
            );
            let at_rest = fixtures::files_containing(&data_dir, value.as_bytes());
            ensure!(
                at_rest.is_empty(),
                "a secret value is at rest in {at_rest:?}"
            );
        }
        Ok(())
    }

    pub(super) async fn expect_concurrency(&mut self, at_most: usize, at_least: usize) -> Check {
        let service = self.service()?;
        service.stop();
        let store = service.data_dir().join(image_builder_state::STORE_DIR);
        let spans = {
            let journal = Journal::open(&store).map_err(|e| format!("journal: {e}"))?;
            let mut spans = Vec::new();
            for summary in journal.summaries().map_err(|e| format!("journal: {e}"))? {
                let view = journal
                    .view(summary.id)
                    .map_err(|e| format!("journal: {e}"))?
                    .ok_or("build vanished")?;
                if let (Some(start), Some(end)) =
                    (view.entered_at_ms(Phase::Resolving), view.finished_at_ms())
                {
                    spans.push((start, end));
                }
            }
            spans
        };
        self.start_again("")?;
        ensure!(
            !spans.is_empty(),
            "no build ran to its end: nothing to measure"
        );
        let most = spans
            .iter()
            .map(|(start, _)| {
                spans
                    .iter()
                    .filter(|(s, e)| s <= start && start < e)
                    .count()
            })
            .max()
            .unwrap_or(0);
        ensure!(
            (at_least..=at_most).contains(&most),
            "{most} builds ran at once, expected at least {at_least} and at most {at_most}: {spans:?}"
        );
        Ok(())
    }
}
