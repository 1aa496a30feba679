//! Test harness: starts real `oneid-node` processes on free loopback ports, each with its own
//! temporary data directory, and stops them by pid.
//!
//! The binary is the one `cargo build` put beside the test executable
//! (`target/<profile>/oneid-node`); `scripts/test` builds it before running the tests.

use oneid_client::{Client, RetryPolicy};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a test node's `cluster.toml`.
#[derive(Clone)]
pub struct NodeOptions {
    pub shards: u32,
    pub clock_interval_ms: u64,
    pub activation_budget: usize,
    /// Extra TOML appended to the file (e.g. a `[rules]` table).
    pub extra: String,
    /// Whether the node has a backup root ([`TestNode::backup_root`]); without one, backups
    /// answer 403.
    pub backups: bool,
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions {
            shards: 4,
            clock_interval_ms: 200,
            activation_budget: 10_000,
            extra: String::new(),
            backups: true,
        }
    }
}

impl NodeOptions {
    /// A node whose leaders propose a clock entry only at first start (then once an hour):
    /// its state, digests included, changes only with writes, so tests can compare digests
    /// taken at different times (see [`TestNode::settled_digests`]).
    pub fn quiet() -> NodeOptions {
        NodeOptions {
            clock_interval_ms: 3_600_000,
            ..NodeOptions::default()
        }
    }
}

/// The shard clock of a shard that never applied a clock entry.
const CLOCK_UNSET: &str = "1970-01-01T00:00:00Z";

pub mod cluster;
pub mod sse;

/// How often [`eventually`] asks again.
const POLL: Duration = Duration::from_millis(50);

/// What a check of [`eventually`] answers: `Some(value)` or `Ok(value)` once what is awaited
/// has happened; until then `None`, or `Err` with what it saw instead, which the panic shows
/// if the deadline passes.
pub trait Outcome {
    type Value;
    /// The value, or what was seen instead (`None`: nothing worth showing).
    fn into_result(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(format!("{seen:#?}")))
    }
}

/// Asks `check` until it answers `Some` or `Ok` (every 50 ms), for at most `within`: its
/// answer, or a panic saying what did not happen and, if `check` answered `Err`, what it saw
/// last. `check` is an async closure, so it may change what it captures (a stream it reads, a
/// counter).
pub async fn eventually<O: Outcome>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + within;
    loop {
        match check().await.into_result() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => match seen {
                Some(seen) => panic!("{what} did not happen within {within:?}; last seen: {seen}"),
                None => panic!("{what} did not happen within {within:?}"),
            },
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Reads `stream` until its peer closes it: everything the peer sent, or the kind of the
/// error that ended the read instead (a reset, say), or `TimedOut` if it is still open after
/// `limit`.
pub async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Result<Vec<u8>, std::io::ErrorKind> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut bytes)).await {
        Ok(Ok(_)) => Ok(bytes),
        Ok(Err(error)) => Err(error.kind()),
        Err(_) => Err(std::io::ErrorKind::TimedOut),
    }
}

/// A running node; killed (SIGKILL) when dropped if still running.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub options: NodeOptions,
    pub port: u16,
    /// A node of a cluster: its id and the cluster's file (else the node writes its own
    /// one-node `cluster.toml`).
    pub member: Option<(u64, PathBuf)>,
    /// The open-file limits (soft, hard) the process starts with, if not the test's own.
    pub open_files: Option<(u64, u64)>,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    built("oneid-node")
}

/// The `oneid` CLI that `cargo build` put beside the test executable.
pub fn cli_binary() -> PathBuf {
    built("oneid")
}

fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let binary = dir.join(name);
    assert!(
        binary.exists(),
        "{} does not exist: build it first (scripts/test does)",
        binary.display()
    );
    binary
}

/// The shard (of `shards`) whose identity index holds `kind=value`.
pub fn shard_of(kind: &str, value: &str, shards: u32) -> u32 {
    oneid_protocol::ids::Identity {
        kind: kind.into(),
        value: value.into(),
    }
    .shard(shards)
    .0
}

/// The first `{prefix}{n}` whose identity of `kind` is held by a shard that `wanted` accepts.
pub fn value_where(kind: &str, prefix: &str, shards: u32, wanted: impl Fn(u32) -> bool) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|v| wanted(shard_of(kind, v, shards)))
        .expect("some value lands on every shard")
}

/// A loopback port free now, and never handed out before by this test process: the kernel
/// may give a port just released to the next bind, so two calls in a row (a node's API and
/// peer ports) could otherwise answer the same one.
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().expect("port list lock");
    for _ in 0..1000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        let port = listener.local_addr().expect("local addr").port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no loopback port left that this process has not handed out")
}

impl TestNode {
    /// Starts a node and waits until it is healthy.
    pub async fn start(options: NodeOptions) -> TestNode {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut node = TestNode {
            dir,
            options,
            port: free_port(),
            member: None,
            open_files: None,
            child: None,
        };
        node.write_config();
        node.restart().await;
        node
    }

    /// A node with its directory and `cluster.toml`, not started.
    pub fn create(options: NodeOptions) -> TestNode {
        let dir = tempfile::tempdir().expect("temporary directory");
        let node = TestNode {
            dir,
            options,
            port: free_port(),
            member: None,
            open_files: None,
            child: None,
        };
        node.write_config();
        node
    }

    /// Starts a new node (own directory and port) with `--restore backup_dir`, and waits until
    /// it is healthy.
    pub async fn start_restored(options: NodeOptions, backup_dir: &Path) -> TestNode {
        let mut node = TestNode::create(options);
        node.restart_with(&[OsStr::new("--restore"), backup_dir.as_os_str()])
            .await;
        node
    }

    pub fn config_path(&self) -> PathBuf {
        match &self.member {
            Some((_, config)) => config.clone(),
            None => self.dir.path().join("cluster.toml"),
        }
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the node's backups go (`[storage] backup_root`): a backup named `dir` is in
    /// `backup_root().join(dir)`.
    pub fn backup_root(&self) -> PathBuf {
        self.dir.path().join("backups")
    }

    fn write_config(&self) {
        let o = &self.options;
        let storage = if o.backups {
            format!(
                "[storage]\nbackup_root = \"{}\"\n\n",
                self.backup_root().display()
            )
        } else {
            String::new()
        };
        let text = format!(
            "[cluster]\nshards = {}\nreplication = 1\nclock_interval_ms = {}\nactivation_budget = {}\n\n{}[[nodes]]\nid = 1\napi = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\ndata = \"{}\"\n\n{}\n",
            o.shards,
            o.clock_interval_ms,
            o.activation_budget,
            storage,
            self.port,
            free_port(),
            self.data_path().display(),
            o.extra
        );
        std::fs::write(self.config_path(), text).expect("writing cluster.toml");
    }

    /// Starts the process (again, on the same data) and waits until it is healthy.
    pub async fn restart(&mut self) {
        self.restart_with(&[]).await;
    }

    /// Starts the process with `extra_args` after `--config FILE`, and waits until it is
    /// healthy.
    pub async fn restart_with(&mut self, extra_args: &[&OsStr]) {
        self.restart_with_env(extra_args, &[]).await;
    }

    /// Starts the process with `extra_args` and environment variables `env` (such as
    /// `FAILPOINTS`), and waits until it is healthy.
    pub async fn restart_with_env(&mut self, extra_args: &[&OsStr], env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the node is already running");
        let child = self.spawn(extra_args, env);
        self.child = Some(child);
        self.wait_healthy().await;
    }

    /// Starts the process without waiting (a cluster's nodes start together).
    pub fn spawn_only(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the node is already running");
        self.child = Some(self.spawn(&[], env));
    }

    /// Waits until the node answers `/healthz` 200 (up to [`START_TIMEOUT`]); panics if it
    /// exits.
    pub async fn wait_healthy(&mut self) {
        let client = self.client();
        eventually("oneid-node becoming healthy", START_TIMEOUT, async || {
            if client.healthy().await {
                return Some(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let logs = self.logs();
                // The last lines that are not a backtrace's.
                let tail: Vec<&str> = logs
                    .lines()
                    .filter(|l| {
                        let l = l.trim_start();
                        !l.starts_with("at ") && !l.starts_with(|c: char| c.is_ascii_digit())
                    })
                    .rev()
                    .take(15)
                    .collect();
                panic!(
                    "oneid-node exited during start: {status}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            None
        })
        .await;
    }

    fn spawn(&self, extra_args: &[&OsStr], env: &[(&str, &str)]) -> Child {
        // One log per start, numbered, so a restart never overwrites an earlier one.
        let starts = std::fs::read_dir(self.dir.path())
            .expect("test directory")
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("node-"))
            })
            .count();
        let log = std::fs::File::create(self.dir.path().join(format!("node-{starts}.log")))
            .expect("log file");
        let mut command = Command::new(binary());
        command.arg("--config").arg(self.config_path());
        if let Some((id, _)) = &self.member {
            command.arg("--node").arg(id.to_string());
        }
        command
            .args(extra_args)
            // ONEID_TEST_LOG (e.g. `info`) makes the nodes' logs say more.
            .env(
                "RUST_LOG",
                std::env::var("ONEID_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((soft, hard)) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec this only calls setrlimit, which is
            // async-signal-safe and allocates nothing.
            unsafe {
                command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard));
            }
        }
        command.spawn().expect("starting oneid-node")
    }

    /// Runs the process with `extra_args` when it is expected to refuse to start: waits for it
    /// to exit (up to [`START_TIMEOUT`]) and answers its status. Panics if it becomes healthy.
    pub async fn run_expecting_exit(&self, extra_args: &[&OsStr]) -> ExitStatus {
        assert!(self.child.is_none(), "the node is already running");
        let mut child = self.spawn(extra_args, &[]);
        let client = self.client_once();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting") {
                return status;
            }
            if client.healthy().await || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("oneid-node started (or ran {START_TIMEOUT:?}) where it had to refuse");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the node's processes wrote to stderr, in start order.
    pub fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("reading the node's directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with("node-") && n.ends_with(".log"))
            })
            .collect();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client with the default retry policy.
    pub fn client(&self) -> Client {
        Client::new(&self.base()).expect("client")
    }

    /// A client that tries once: for asserting exact answers.
    pub fn client_once(&self) -> Client {
        Client::with_policy(
            &self.base(),
            RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default()
            },
        )
        .expect("client")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits (up to [`START_TIMEOUT`]) for the process to end by itself, and answers how.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the node did not exit within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has ended (it is then no longer running), without
    /// waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("waiting")?;
        self.child = None;
        Some(status)
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping");
    }

    /// SIGTERM, then the exit status (waits up to a minute).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("waiting") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not stop within a minute of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Each shard's state digest, in shard order.
    pub async fn digests(&self) -> Vec<String> {
        let view = self.client().cluster().await.expect("cluster view");
        view.shards.into_iter().map(|s| s.digest).collect()
    }

    /// Each shard's digest once every shard has applied a clock entry and all it committed.
    /// On a [`NodeOptions::quiet`] node nothing but writes changes them after that, so two
    /// settled digests taken at different times are equal exactly when no write changed state.
    pub async fn settled_digests(&self) -> Vec<String> {
        let client = self.client();
        eventually(
            "every shard applying a clock entry and all it committed",
            START_TIMEOUT,
            async || {
                let view = client.cluster().await.expect("cluster view");
                if view
                    .shards
                    .iter()
                    .all(|s| s.clock != CLOCK_UNSET && s.applied_index == s.commit_index)
                {
                    Ok(view.shards.into_iter().map(|s| s.digest).collect())
                } else {
                    Err(view.shards)
                }
            },
        )
        .await
    }

    /// The value of an unlabelled counter in `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.client().metrics().await.expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A rules document written as JSON in a test, read as the node reads it (strictly).
pub fn rules_doc(json: &serde_json::Value) -> oneid_protocol::rules::RulesDoc {
    oneid_protocol::strict::from_json(json.to_string().as_bytes()).expect("a rules document")
}

/// The rules a node answers, as JSON (to compare with what a test wrote).
pub async fn rules_json(
    client: &oneid_client::Client,
) -> Result<serde_json::Value, oneid_client::Error> {
    let rules = client.rules().await?;
    Ok(serde_json::to_value(rules).expect("rules serialize"))
}
