//! Identical registry questions asked at once get one request: the first caller asks (with its
//! retries), the others wait for its answer. Nothing is kept once the answer is out, so a tag
//! moved a moment later is seen by the next question.
//!
//! Cancel-safe: if the asking caller goes away (its client hung up), the waiting ones are told
//! and one of them asks again.

use std::collections::HashMap;
use std::future::Future;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Error;
use crate::credentials::Secret;
use crate::steps::Lane;

/// Which question: what is asked (`lookup`, `resolve`), of which reference, with which
/// credential (its SHA-256: callers with different credentials may get different answers).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) struct Question {
    kind: &'static str,
    reference: String,
    credential: Option<[u8; 32]>,
    /// A caller's question never waits in a build's queue for a host, nor the reverse.
    lane: Lane,
}

impl Question {
    pub(super) fn new(
        kind: &'static str,
        reference: &str,
        credential: Option<&Secret>,
        lane: Lane,
    ) -> Self {
        Self {
            kind,
            reference: reference.to_owned(),
            credential: credential.map(Secret::fingerprint),
            lane,
        }
    }

    /// A question asked with the credential whose fingerprint is `credential`.
    pub(super) fn by_fingerprint(
        kind: &'static str,
        reference: &str,
        credential: [u8; 32],
        lane: Lane,
    ) -> Self {
        Self {
            kind,
            reference: reference.to_owned(),
            credential: Some(credential),
            lane,
        }
    }
}

type Answer<T> = Option<Result<T, Error>>;

/// The questions in flight and where their answers will appear.
pub(super) struct Coalescer<T> {
    in_flight: Mutex<HashMap<Question, watch::Receiver<Answer<T>>>>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

/// Forgets a question when its asker is done or gone.
struct Asking<'a, T> {
    coalescer: &'a Coalescer<T>,
    question: &'a Question,
}

impl<T> Drop for Asking<'_, T> {
    fn drop(&mut self) {
        self.coalescer.in_flight.lock().remove(self.question);
    }
}

impl<T: Clone> Coalescer<T> {
    /// The answer to `question`: that of the request `ask` makes, or of an identical question
    /// already in flight. Only the asker makes the request's future, on the heap: the waiting
    /// callers' futures stay small (a manifest lookup's request future is 13 KB, which every
    /// caller's future held and copied when it was boxed).
    pub(super) async fn answer<F, Fut>(&self, question: Question, ask: F) -> Result<T, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let tx = loop {
            let mut waiting = {
                let mut in_flight = self.in_flight.lock();
                match in_flight.get(&question) {
                    Some(answer) => answer.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        in_flight.insert(question.clone(), rx);
                        break tx;
                    }
                }
            };
            // An error here means the asker went away without an answer: ask again.
            if let Ok(answer) = waiting.wait_for(Option::is_some).await
                && let Some(answer) = answer.clone()
            {
                return answer;
            }
        };
        let asking = Asking {
            coalescer: self,
            question: &question,
        };
        let answer = Box::pin(ask()).await;
        drop(asking);
        tx.send_replace(Some(answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn identical_questions_at_once_get_one_request_and_the_same_answer() {
        let coalescer = Arc::new(Coalescer::<String>::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::new();
        for _ in 0..100 {
            let coalescer = Arc::clone(&coalescer);
            let asked = Arc::clone(&asked);
            calls.push(tokio::spawn(async move {
                let question = Question::new("lookup", "r/a:1", None, Lane::Build);
                coalescer
                    .answer(question, || async {
                        asked.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok("sha256:1".to_owned())
                    })
                    .await
            }));
        }
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), "sha256:1");
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Nothing is kept: the next question is asked again.
        let again = coalescer
            .answer(
                Question::new("lookup", "r/a:1", None, Lane::Build),
                || async { Ok("sha256:2".to_owned()) },
            )
            .await;
        assert_eq!(again.unwrap(), "sha256:2");
    }

    #[tokio::test]
    async fn other_credentials_and_references_are_other_questions() {
        let basic = |password: &str| Secret::Basic {
            user: "u".into(),
            password: password.into(),
        };
        let a = Question::new("lookup", "r/a:1", Some(&basic("one")), Lane::Build);
        assert_ne!(
            a,
            Question::new("lookup", "r/a:1", Some(&basic("two")), Lane::Build)
        );
        assert_ne!(a, Question::new("lookup", "r/a:1", None, Lane::Build));
        assert_ne!(
            a,
            Question::new("lookup", "r/a:2", Some(&basic("one")), Lane::Build)
        );
        assert_ne!(
            a,
            Question::new("resolve", "r/a:1", Some(&basic("one")), Lane::Build)
        );
        assert_ne!(
            a,
            Question::new("lookup", "r/a:1", Some(&basic("one")), Lane::Caller)
        );
        assert_eq!(
            a,
            Question::new("lookup", "r/a:1", Some(&basic("one")), Lane::Build)
        );
        assert!(!format!("{a:?}").contains("one"), "{a:?}");
    }

    #[tokio::test]
    async fn when_the_asker_goes_away_a_waiting_caller_asks_again() {
        let coalescer = Arc::new(Coalescer::<String>::default());
        let question = Question::new("lookup", "r/a:1", None, Lane::Build);
        let (asking, asked) = tokio::sync::oneshot::channel();
        let asker = {
            let coalescer = Arc::clone(&coalescer);
            let question = question.clone();
            tokio::spawn(async move {
                coalescer
                    .answer(question, || async {
                        asking.send(()).unwrap();
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok("never".to_owned())
                    })
                    .await
            })
        };
        asked.await.expect("the first caller asks");
        // Polled by hand: pending means it waits on the asker's answer.
        let waiter = coalescer.answer(question, || async { Ok("asked again".to_owned()) });
        tokio::pin!(waiter);
        assert!(
            futures::poll!(&mut waiter).is_pending(),
            "the second caller waits on the first's question"
        );
        asker.abort();
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiting caller is not left hanging");
        assert_eq!(answer.unwrap(), "asked again");
    }
}
