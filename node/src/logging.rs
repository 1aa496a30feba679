//! Logging: the node's `tracing` subscriber (raft-rs's own records reach it through the
//! replica crate's bridge, target `raft`).

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`: raft-rs then says why
/// a replica stepped down or started an election, which happens only around leader changes),
/// output to stderr.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .init();
}
