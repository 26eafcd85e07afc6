//! [`ClientError`]: why a call failed, classified by cause (docs/api.md "Errors"), so callers branch on
//! a variant instead of a `tonic::Code`, and retries are decided in one place
//! ([`ClientError::is_retryable`]).

use credits_common::MoneyError;
use credits_common::error::ServiceError;
use tonic::Code;

/// A failed call. Every variant carries the server's message (which names the field or the
/// rule), or, for [`ClientError::BadResponse`], what the client could not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Malformed or out-of-range input; the message names the field. Also what the
    /// client's own parsing of an input (an amount, an account id) reports.
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String },
    /// An account, payment method or charge the service does not know.
    #[error("not found: {message}")]
    NotFound { message: String },
    /// An idempotency key reused with a different request (R12), or an account created
    /// again with different settings.
    #[error("already exists: {message}")]
    AlreadyExists { message: String },
    /// A product rule refused the request; the message states the rule.
    #[error("failed precondition: {message}")]
    FailedPrecondition { message: String },
    /// No token, or not a token the service knows.
    #[error("unauthenticated: {message}")]
    Unauthenticated { message: String },
    /// A token whose role may not make this call.
    #[error("permission denied: {message}")]
    PermissionDenied { message: String },
    /// The service, or one of its dependencies, could not be reached. Transient.
    #[error("unavailable: {message}")]
    Unavailable { message: String },
    /// The call did not answer within the client's timeout. Transient; whether it took
    /// effect is unknown, which is why only repeatable calls are retried.
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded { message: String },
    /// The service failed on its side.
    #[error("internal: {message}")]
    Internal { message: String },
    /// The service answered something this client cannot read (a missing field, an
    /// unknown enum value, an amount that is not a decimal).
    #[error("bad response: {message}")]
    BadResponse { message: String },
    /// Any other gRPC status (`CANCELLED`, `ABORTED`, `OUT_OF_RANGE`, `UNIMPLEMENTED`, …),
    /// with its code kept as it came.
    #[error("{code:?}: {message}")]
    Other { code: Code, message: String },
}

impl ClientError {
    pub(crate) fn bad_response(message: impl Into<String>) -> Self {
        ClientError::BadResponse {
            message: message.into(),
        }
    }

    /// Whether the same request may succeed if sent again: the service was unreachable,
    /// the call timed out, or the server aborted it. Never true for a refusal.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable { .. }
                | ClientError::DeadlineExceeded { .. }
                | ClientError::Other {
                    code: Code::Aborted,
                    ..
                }
        )
    }

    /// The gRPC code of the failure. A [`ClientError::BadResponse`] is `INTERNAL`.
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidArgument { .. } => Code::InvalidArgument,
            ClientError::NotFound { .. } => Code::NotFound,
            ClientError::AlreadyExists { .. } => Code::AlreadyExists,
            ClientError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ClientError::Unauthenticated { .. } => Code::Unauthenticated,
            ClientError::PermissionDenied { .. } => Code::PermissionDenied,
            ClientError::Unavailable { .. } => Code::Unavailable,
            ClientError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ClientError::Internal { .. } | ClientError::BadResponse { .. } => Code::Internal,
            ClientError::Other { code, .. } => *code,
        }
    }

    /// The server's message (or the client's, for a bad response or a local parse error).
    pub fn message(&self) -> &str {
        match self {
            ClientError::InvalidArgument { message }
            | ClientError::NotFound { message }
            | ClientError::AlreadyExists { message }
            | ClientError::FailedPrecondition { message }
            | ClientError::Unauthenticated { message }
            | ClientError::PermissionDenied { message }
            | ClientError::Unavailable { message }
            | ClientError::DeadlineExceeded { message }
            | ClientError::Internal { message }
            | ClientError::BadResponse { message }
            | ClientError::Other { message, .. } => message,
        }
    }

    /// The error for a status code and message, as a server would have sent them (used
    /// for the per-item statuses of `RecordUsageBatch`).
    pub fn from_code(code: Code, message: impl Into<String>) -> Self {
        let message = message.into();
        match code {
            Code::InvalidArgument => ClientError::InvalidArgument { message },
            Code::NotFound => ClientError::NotFound { message },
            Code::AlreadyExists => ClientError::AlreadyExists { message },
            Code::FailedPrecondition => ClientError::FailedPrecondition { message },
            Code::Unauthenticated => ClientError::Unauthenticated { message },
            Code::PermissionDenied => ClientError::PermissionDenied { message },
            Code::Unavailable => ClientError::Unavailable { message },
            Code::DeadlineExceeded => ClientError::DeadlineExceeded { message },
            Code::Internal => ClientError::Internal { message },
            code => ClientError::Other { code, message },
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::from_code(s.code(), s.message())
    }
}

/// An amount the caller typed that is not one (parsed before anything is sent).
impl From<MoneyError> for ClientError {
    fn from(e: MoneyError) -> Self {
        ClientError::InvalidArgument {
            message: e.to_string(),
        }
    }
}

/// A field the caller typed that the shared validators refuse (`AccountId::parse`,
/// `IdempotencyKey::parse`): the same class and message the server would answer.
impl From<ServiceError> for ClientError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(message) => ClientError::InvalidArgument { message },
            ServiceError::NotFound(message) => ClientError::NotFound { message },
            ServiceError::AlreadyExists(message) => ClientError::AlreadyExists { message },
            ServiceError::FailedPrecondition(message) => {
                ClientError::FailedPrecondition { message }
            }
            ServiceError::Unavailable(message) => ClientError::Unavailable { message },
            ServiceError::Internal(message) => ClientError::Internal { message },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_cause() {
        let cases = [
            (Code::InvalidArgument, "InvalidArgument"),
            (Code::NotFound, "NotFound"),
            (Code::AlreadyExists, "AlreadyExists"),
            (Code::FailedPrecondition, "FailedPrecondition"),
            (Code::Unauthenticated, "Unauthenticated"),
            (Code::PermissionDenied, "PermissionDenied"),
            (Code::Unavailable, "Unavailable"),
            (Code::DeadlineExceeded, "DeadlineExceeded"),
            (Code::Internal, "Internal"),
            (Code::Aborted, "Other"),
            (Code::OutOfRange, "Other"),
        ];
        for (code, variant) in cases {
            let e = ClientError::from(tonic::Status::new(code, "the server's words"));
            assert!(format!("{e:?}").starts_with(variant), "{code:?}: {e:?}");
            assert_eq!(e.code(), code, "the code survives the round trip");
            assert_eq!(e.message(), "the server's words");
        }
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        let retryable = |c| ClientError::from_code(c, "m").is_retryable();
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::DeadlineExceeded));
        assert!(retryable(Code::Aborted));
        for c in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
        assert!(!ClientError::bad_response("x").is_retryable());
    }

    #[test]
    fn local_parse_errors_read_like_the_servers() {
        let e =
            ClientError::from(credits_common::Money::parse_positive("amount", "1e3").unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("amount: exponent"), "{e}");
        let e = ClientError::from(credits_common::ids::AccountId::parse("a b").unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("account_id:"), "{e}");
    }

    #[test]
    fn a_bad_response_is_internal() {
        let e = ClientError::bad_response("balance: not a decimal");
        assert_eq!(e.code(), Code::Internal);
        assert_eq!(e.to_string(), "bad response: balance: not a decimal");
    }
}
