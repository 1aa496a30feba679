//! `GET /v1/admin/identity-audit`: every shard audited at once, each a page at a time (at most
//! `oneid_state::audit::AUDIT_PAGE_KEYS_MAX` keys per read, on the read pool of a node that
//! holds a replica), within [`IDENTITY_AUDIT_WITHIN`]; a shard not done by then is left out of
//! the counts and of `shards_done`.

use super::{json, Api, Reply};
use crate::shards::{per_shard, Consistency};
use crate::storage::{Answer, Query};
use hyper::StatusCode;
use oneid_protocol::api::{IdentityAudit, KindAuditDoc};
use oneid_protocol::ids::ShardId;
use oneid_state::audit::AuditPage;
use std::time::Duration;
use tokio::time::Instant;

/// How long one audit request reads shards.
pub const IDENTITY_AUDIT_WITHIN: Duration = Duration::from_secs(10);
/// The pause before a shard's failed read is tried again.
const AUDIT_RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Api {
    pub(super) async fn identity_audit(&self) -> Reply {
        let deadline = Instant::now() + IDENTITY_AUDIT_WITHIN;
        let shards = (0..self.shards.n_shards).map(ShardId);
        let audits =
            per_shard(shards.map(|shard| (shard, self.audit_shard(shard, deadline)))).await;
        let mut total = AuditPage::default();
        let mut shards_done = 0;
        for audit in audits.values().flatten() {
            total.add(audit);
            shards_done += 1;
        }
        let audit = IdentityAudit {
            kinds: total
                .kinds
                .into_iter()
                .map(|(kind, audit)| {
                    let doc = KindAuditDoc {
                        over_limit: audit.over_limit,
                        blocked_bound: audit.blocked_bound,
                    };
                    (kind, doc)
                })
                .collect(),
            shards_done,
            shards_total: self.shards.n_shards,
        };
        Ok(json(StatusCode::OK, &audit))
    }

    /// The shard's audit, page by page, if it ends before `deadline` (a read that fails is
    /// tried again until then).
    async fn audit_shard(&self, shard: ShardId, deadline: Instant) -> Option<AuditPage> {
        let mut total = AuditPage::default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let query = Query::IdentityAudit {
                shard,
                after: after.clone(),
            };
            let read = self.shards.read(shard, query, Consistency::Stale);
            let page = match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return None,
                Ok(Ok((Answer::IdentityAudit(page), _))) => page,
                Ok(Ok((other, _))) => panic!("an audit read answered {other:?}"),
                Ok(Err(error)) => {
                    tracing::debug!(%shard, %error, "an audit read failed; retrying");
                    let pause = Instant::now() + AUDIT_RETRY_PAUSE;
                    tokio::time::sleep_until(deadline.min(pause)).await;
                    continue;
                }
            };
            total.add(&page);
            match page.next {
                Some(next) => after = Some(next),
                None => return Some(total),
            }
        }
    }
}
