//! Wire types of the credits services, generated from `proto/` at build time.
//!
//! Only the gRPC layer of each daemon (and clients) should touch these types; domain code
//! converts them with `TryFrom` at the edge.

#![allow(clippy::derive_partial_eq_without_eq, clippy::large_enum_variant)]

/// One module per package: `credits.<service>.v1` is `<service>::v1`.
macro_rules! packages {
    ($($service:ident => $package:literal),+ $(,)?) => {
        $(pub mod $service {
            pub mod v1 {
                tonic::include_proto!($package);
            }
        })+
    };
}

packages! {
    ledger => "credits.ledger.v1",
    payments => "credits.payments.v1",
    recharge => "credits.recharge.v1",
    portal => "credits.portal.v1",
}

/// Encoded `FileDescriptorSet` of every credits proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("credits_descriptor");
