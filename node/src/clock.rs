//! The node's wall clock: the one place the shells read it (the API's receipt times and
//! segment definition times, the leader's clock proposals, backup manifests, the replicas' life
//! numbers). The state
//! machine and the replica core never do; time reaches them as values.

use oneid_protocol::num::Millis;
use std::time::SystemTime;

/// The wall clock now.
pub fn wall_now() -> Millis {
    Millis::from_system_time(SystemTime::now())
}

/// The wall clock now in microseconds: a number unique to this start of the node's replicas
/// (`ReplicaConfig::life`), which tells this life's ReadIndex rounds from earlier lives' ones.
pub fn life_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64
}
