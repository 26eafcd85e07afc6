//! Retries with exponential backoff, for the calls that are safe to send twice.
//!
//! A call is repeatable when sending it again cannot do anything the first send did not:
//! reads, and money-moving calls that carry an idempotency key (R12: the same key with the
//! same request returns the first result). Everything else — adding, removing or
//! defaulting a payment method, changing auto-recharge — is sent once, whatever happens,
//! because a timed-out first send may have taken effect.

use std::hash::BuildHasher;
use std::time::Duration;

use crate::ClientError;

/// Attempts (first send included) of a repeatable call under [`RetryPolicy::default`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// The most attempts any policy makes, whatever it is configured with.
pub const MAX_ATTEMPTS_LIMIT: u32 = 10;
/// The wait before the first retry; each further retry waits twice as long.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often, and how patiently, a repeatable call is retried after a transient failure
/// ([`ClientError::is_retryable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl RetryPolicy {
    /// Up to `max_attempts` sends in all (clamped to `1..=MAX_ATTEMPTS_LIMIT`), waiting
    /// `initial_backoff`, then twice that, … but never more than `max_backoff`.
    pub fn new(max_attempts: u32, initial_backoff: Duration, max_backoff: Duration) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.clamp(1, MAX_ATTEMPTS_LIMIT),
            initial_backoff,
            max_backoff: max_backoff.max(initial_backoff),
        }
    }

    /// Every call is sent exactly once.
    pub fn none() -> Self {
        RetryPolicy::new(1, Duration::ZERO, Duration::ZERO)
    }

    /// Sends in all for a repeatable call, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The longest wait before retry number `retry` (1 = the first retry): the initial
    /// backoff doubled `retry - 1` times, capped at the maximum. The actual wait is
    /// jittered between half of this and all of it, so callers that failed together do
    /// not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new(
            DEFAULT_MAX_ATTEMPTS,
            DEFAULT_INITIAL_BACKOFF,
            DEFAULT_MAX_BACKOFF,
        )
    }
}

/// Whether a call may be sent again after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// A read, or a write whose repetition the server recognises (idempotency key,
    /// create-if-absent with the same settings, a versioned threshold write).
    Safe,
    /// A write that may have taken effect even when its answer was lost.
    Once,
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's attempts are spent.
pub(crate) async fn run<T, Fut>(
    policy: &RetryPolicy,
    repeat: Repeat,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, ClientError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let max = match repeat {
        Repeat::Safe => policy.max_attempts(),
        Repeat::Once => 1,
    };
    let mut sent = 1;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(status) => {
                let e = ClientError::from(status);
                if sent >= max || !e.is_retryable() {
                    return Err(e);
                }
                tokio::time::sleep(jitter(policy.backoff(sent))).await;
                sent += 1;
            }
        }
    }
}

/// One RPC under the policy: a fresh clone of the generated client and of the request
/// per attempt, the answer unwrapped from its `tonic::Response`.
/// One RPC of a facade (`self.retry`, `self.inner`) under [`call`]:
/// `rpc!(self, Repeat::Safe, request, method_name)`.
macro_rules! rpc {
    ($facade:expr, $repeat:expr, $req:expr, $method:ident) => {
        $crate::retry::call(
            &$facade.retry,
            $repeat,
            &$facade.inner,
            $req,
            |mut c, r| async move { c.$method(r).await },
        )
    };
}
pub(crate) use rpc;

pub(crate) async fn call<C, Req, Resp, Fut>(
    policy: &RetryPolicy,
    repeat: Repeat,
    client: &C,
    req: Req,
    rpc: impl Fn(C, Req) -> Fut,
) -> Result<Resp, ClientError>
where
    C: Clone,
    Req: Clone,
    Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    run(policy, repeat, || rpc(client.clone(), req.clone()))
        .await
        .map(tonic::Response::into_inner)
}

/// A wait between half of `d` and `d` ("equal jitter").
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    half + Duration::from_nanos(random % spread.saturating_add(1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy::new(attempts, Duration::ZERO, Duration::ZERO)
    }

    async fn failing_with(
        policy: RetryPolicy,
        repeat: Repeat,
        code: tonic::Code,
    ) -> (Result<(), ClientError>, u32) {
        let sent = AtomicU32::new(0);
        let r = run(&policy, repeat, || {
            sent.fetch_add(1, Ordering::SeqCst);
            async move { Err::<(), _>(tonic::Status::new(code, "down")) }
        })
        .await;
        (r, sent.load(Ordering::SeqCst))
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::new(
            MAX_ATTEMPTS_LIMIT,
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let waits: Vec<_> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn attempts_are_bounded() {
        assert_eq!(
            RetryPolicy::new(0, Duration::ZERO, Duration::ZERO).max_attempts(),
            1
        );
        assert_eq!(
            RetryPolicy::new(1000, Duration::ZERO, Duration::ZERO).max_attempts(),
            MAX_ATTEMPTS_LIMIT
        );
        assert_eq!(RetryPolicy::default().max_attempts(), DEFAULT_MAX_ATTEMPTS);
        assert_eq!(RetryPolicy::none().max_attempts(), 1);
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    /// Repeatable calls retry transient failures until the attempts run out; calls that
    /// are not repeatable are sent once; refusals are never retried.
    #[tokio::test]
    async fn only_repeatable_calls_retry_and_only_transient_failures() {
        let cases = [
            (Repeat::Safe, tonic::Code::Unavailable, 3),
            (Repeat::Once, tonic::Code::Unavailable, 1),
            (Repeat::Safe, tonic::Code::AlreadyExists, 1),
        ];
        for (repeat, code, attempts) in cases {
            let (r, sent) = failing_with(quick(3), repeat, code).await;
            assert_eq!(r.unwrap_err().code(), code);
            assert_eq!(sent, attempts, "{repeat:?} {code:?}");
        }
    }

    #[tokio::test]
    async fn a_retry_that_succeeds_returns_its_answer() {
        let sent = AtomicU32::new(0);
        let r = run(&quick(3), Repeat::Safe, || {
            let n = sent.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(tonic::Status::deadline_exceeded("slow"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 1);
    }
}
