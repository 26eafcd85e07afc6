//! `credits.portal.v1.PortalService`: wire ↔ [`crate::Sessions`], nothing else.

use std::sync::Arc;

use credits_proto::portal::v1 as opb;
use credits_proto::portal::v1::portal_service_server::PortalService;
use tonic::{Request, Response, Status};

use crate::Sessions;

pub struct PortalGrpc {
    sessions: Arc<Sessions>,
}

impl PortalGrpc {
    pub fn new(sessions: Arc<Sessions>) -> Self {
        PortalGrpc { sessions }
    }
}

#[tonic::async_trait]
impl PortalService for PortalGrpc {
    async fn create_portal_session(
        &self,
        req: Request<opb::CreatePortalSessionRequest>,
    ) -> Result<Response<opb::PortalSession>, Status> {
        let r = req.into_inner();
        let s = self.sessions.create(&r.account_id, r.ttl_seconds).await?;
        Ok(Response::new(opb::PortalSession {
            url: s.url,
            expires_at: Some(credits_common::ids::timestamp(s.expires_at)),
            account_id: s.account.to_string(),
        }))
    }

    async fn revoke_portal_sessions(
        &self,
        req: Request<opb::RevokePortalSessionsRequest>,
    ) -> Result<Response<opb::RevokePortalSessionsResponse>, Status> {
        let r = req.into_inner();
        let n = self.sessions.revoke(&r.account_id).await?;
        Ok(Response::new(opb::RevokePortalSessionsResponse {
            revoked: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }
}
