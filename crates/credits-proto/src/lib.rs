//! Wire types of the credits services, generated from `proto/` at build time.
//!
//! Only the gRPC layer of each daemon (and clients) should touch these types; domain code
//! converts them with `TryFrom` at the edge.

#![allow(clippy::derive_partial_eq_without_eq, clippy::large_enum_variant)]

pub mod ledger {
    pub mod v1 {
        tonic::include_proto!("credits.ledger.v1");
    }
}

pub mod payments {
    pub mod v1 {
        tonic::include_proto!("credits.payments.v1");
    }
}

pub mod recharge {
    pub mod v1 {
        tonic::include_proto!("credits.recharge.v1");
    }
}

pub mod portal {
    pub mod v1 {
        tonic::include_proto!("credits.portal.v1");
    }
}

/// Encoded `FileDescriptorSet` of every credits proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("credits_descriptor");
