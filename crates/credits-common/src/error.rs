//! The classes of error every credits service answers with: one variant per gRPC status
//! class of docs/api.md "Errors", each carrying a message that names the field or the rule.
//!
//! Shared code (ids, money, the database, a peer's answer) fails with a class. Each domain
//! has its own error enum whose variants are the causes (`AccountNotFound`,
//! `IdempotencyConflict`, `BelowMinimumPurchase`, …); it maps each cause to its class
//! exhaustively (`From<DomainError> for ServiceError`) and [`domain_error!`] derives the
//! rest (from money, database and class errors; to `tonic::Status`; `is_transient`).

use crate::money::MoneyError;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        ServiceError::FailedPrecondition(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        ServiceError::NotFound(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        ServiceError::Internal(msg.into())
    }

    /// Whether repeating the same request (same idempotency key) may succeed: a dependency
    /// was down. Every other error is an answer about the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, ServiceError::Unavailable(_))
    }
}

impl From<MoneyError> for ServiceError {
    fn from(e: MoneyError) -> Self {
        ServiceError::InvalidArgument(e.to_string())
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_connection_error(&e) {
            return ServiceError::Unavailable(format!("database unavailable: {e}"));
        }
        if let sqlx::Error::Database(d) = &e
            && d.code().as_deref() == Some("23505")
        {
            return ServiceError::AlreadyExists(d.message().to_owned());
        }
        tracing::error!(error = %e, "database error");
        ServiceError::Internal("internal database error".to_owned())
    }
}

/// A dependency answered with a gRPC error: keep its class, say who answered.
impl From<tonic::Status> for ServiceError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => ServiceError::InvalidArgument(msg),
            Code::NotFound => ServiceError::NotFound(msg),
            Code::AlreadyExists => ServiceError::AlreadyExists(msg),
            Code::FailedPrecondition => ServiceError::FailedPrecondition(msg),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Aborted
            // A peer that died mid-call answers UNKNOWN: it is down, not broken.
            | Code::Unknown => ServiceError::Unavailable(msg),
            // Our credentials are refused by a peer: to our caller that is a dependency
            // down (misconfigured), retryable once fixed; their request was fine.
            Code::Unauthenticated | Code::PermissionDenied => ServiceError::Unavailable(format!(
                "a dependency refused this service's credentials: {msg}"
            )),
            // Said by a peer, not by us: named as such, so that a peer's codec error
            // ("failed to decode …") is never mistaken for our caller's bad message.
            _ => ServiceError::Internal(format!("dependency: {msg}")),
        }
    }
}

/// The conversions every domain error enum shares, given its map to [`ServiceError`]
/// (`From<Domain> for ServiceError`, the causes' classes) and its four variants for what
/// shared code reports (`Invalid`, `Conflict`, `Unavailable`, `Internal`, each a message):
/// from a class, a money or a database error; to `tonic::Status`; `is_transient` (true
/// exactly when the class is `Unavailable`); and the `invalid`/`internal` constructors.
#[macro_export]
macro_rules! domain_error {
    ($t:ident) => {
        /// Shared code (ids, money, the database) fails with a class; of those only these
        /// arise in a domain, so a not-found or precondition class here is a bug.
        impl From<$crate::error::ServiceError> for $t {
            fn from(e: $crate::error::ServiceError) -> Self {
                use $crate::error::ServiceError as C;
                match e {
                    C::InvalidArgument(m) => $t::Invalid(m),
                    C::AlreadyExists(m) => $t::Conflict(m),
                    C::Unavailable(m) => $t::Unavailable(m),
                    C::NotFound(m) | C::FailedPrecondition(m) => {
                        $t::Internal(format!("unexpected: {m}"))
                    }
                    C::Internal(m) => $t::Internal(m),
                }
            }
        }
        impl From<$crate::money::MoneyError> for $t {
            fn from(e: $crate::money::MoneyError) -> Self {
                $crate::error::ServiceError::from(e).into()
            }
        }
        impl From<$crate::error::DbError> for $t {
            fn from(e: $crate::error::DbError) -> Self {
                $crate::error::ServiceError::from(e).into()
            }
        }
        impl From<$t> for $crate::error::Status {
            fn from(e: $t) -> Self {
                $crate::error::ServiceError::from(e).into()
            }
        }
        impl $t {
            /// Whether repeating the same request (same idempotency key) may succeed: a
            /// dependency was down. Every other error is an answer about the request.
            pub fn is_transient(&self) -> bool {
                $crate::error::ServiceError::from(self.clone()).is_transient()
            }

            /// A field breaks a rule; the message starts with the field's name.
            pub fn invalid(msg: impl Into<String>) -> Self {
                $t::Invalid(msg.into())
            }

            pub fn internal(msg: impl Into<String>) -> Self {
                $t::Internal(msg.into())
            }
        }
    };
}

/// The database error type, named for [`domain_error!`].
pub type DbError = sqlx::Error;
/// The gRPC status type, named for [`domain_error!`].
pub type Status = tonic::Status;

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ServiceError::NotFound(m) => tonic::Status::not_found(m),
            ServiceError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ServiceError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ServiceError::Unavailable(m) => tonic::Status::unavailable(m),
            ServiceError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
