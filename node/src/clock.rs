//! The node's wall clock: the one place the shells read it (the API's receipt times and
//! segment definition times, the leader's clock proposals, backup manifests). The state
//! machine and the replica core never do; time reaches them as values.

use oneid_protocol::num::Millis;
use std::time::SystemTime;

/// The wall clock now.
pub fn wall_now() -> Millis {
    Millis::from_system_time(SystemTime::now())
}
