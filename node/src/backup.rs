//! Online backups and restores.
//!
//! A **backup** copies one fjall snapshot (one sequence number across every keyspace, so each
//! shard's state, log and hard state agree with one another, as after a crash at that instant)
//! into a new fjall database in a new or empty directory, in bounded batches, makes it durable,
//! and then writes `backup.json` (the [`Manifest`]) beside it. The manifest is written last: a
//! directory without one is not a backup. While copying, each shard's pairs are hashed again and
//! must add up to the digest its state records, so a backup that would not verify on restore
//! fails now instead. One backup runs at a time; writes go on meanwhile.
//!
//! A **restore** copies a backup's directory (all but the manifest) into the node's absent or
//! empty data directory before the node opens it; once the shards are recovered, each one's
//! applied index and digest (as recorded, and recomputed from its pairs) must equal the
//! manifest's before the node serves. A marker file in the data directory lives until that
//! check passes, and a node does not start on a data directory that has one: an interrupted or
//! failed restore is never served.

use crate::storage::{ShardDigest, Storage, OLDEST_MIGRATED_FORMAT, STATE_FORMAT};
use anyhow::{anyhow, bail, ensure, Context};
use oneid_protocol::api::{BackupKeyspace, BackupShard};
use oneid_protocol::ids::ShardId;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use oneid_protocol::api::BackupManifest as Manifest;

/// The manifest's file name in a backup directory.
pub const MANIFEST_FILE: &str = "backup.json";
/// The file that marks a data directory as holding a restore not yet verified.
pub const RESTORE_MARKER: &str = "oneid-restore-in-progress";

/// Why a backup was not taken.
#[derive(Debug)]
pub enum BackupError {
    /// The node has no backup root: backups are off.
    Forbidden,
    /// The directory cannot take a backup (absolute, outside the backup root, not empty,
    /// inside the data directory...).
    InvalidDir(String),
    /// Another backup is running.
    Busy,
    /// The node is shutting down.
    ShuttingDown,
    /// Reading the snapshot or writing the backup failed.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for BackupError {
    fn from(error: anyhow::Error) -> BackupError {
        BackupError::Failed(error)
    }
}

impl std::fmt::Display for BackupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupError::Forbidden => f.write_str("backups are off on this node: set [storage] backup_root in its cluster.toml to the directory backups may go under, and restart it"),
            BackupError::InvalidDir(message) => f.write_str(message),
            BackupError::Busy => f.write_str("a backup is already running"),
            BackupError::ShuttingDown => f.write_str("the node is shutting down"),
            BackupError::Failed(error) => write!(f, "the backup failed: {error:#}"),
        }
    }
}

/// The node's backups: what they copy, and the one-at-a-time rule.
pub struct Backups {
    storage: Arc<Storage>,
    node_id: u64,
    data_dir: PathBuf,
    /// `[storage] backup_root`, absolute; `None`: backups are off.
    root: Option<PathBuf>,
    running: AtomicBool,
    cancelled: AtomicBool,
}

/// The right to run the one backup; released when dropped.
pub struct Running(Arc<Backups>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

impl Backups {
    pub fn new(
        storage: Arc<Storage>,
        node_id: u64,
        data_dir: PathBuf,
        root: Option<PathBuf>,
    ) -> Arc<Backups> {
        Arc::new(Backups {
            storage,
            node_id,
            data_dir,
            root,
            running: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
        })
    }

    /// Claims the one backup slot.
    pub fn begin(self: &Arc<Self>) -> Result<Running, BackupError> {
        if self.root.is_none() {
            return Err(BackupError::Forbidden);
        }
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(BackupError::ShuttingDown);
        }
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(BackupError::Busy);
        }
        Ok(Running(Arc::clone(self)))
    }

    /// Stops a running backup at its next batch (its partial copy is removed) and refuses new
    /// ones: the node is shutting down.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

impl Running {
    /// Takes the backup into `dir`, relative to the backup root. Blocking: run it on a
    /// blocking thread.
    pub fn run(&self, dir: &Path) -> Result<Manifest, BackupError> {
        let b = &self.0;
        let root = b.root.as_deref().ok_or(BackupError::Forbidden)?;
        let dir = place(root, dir, &b.data_dir)?;
        backup(&b.storage, b.node_id, &dir, &b.cancelled)
    }
}

/// Where a backup named `dir` goes: `dir` must be relative, without `..`, and stay under
/// `root` (created if absent) once symlinks are resolved, outside the data directory. Answers
/// the resolved path, which the backup then writes: a symlink swapped in after this check is
/// not followed out of the root by the path already resolved (though one swapped into the
/// part not created yet could be; only the node's own user can do that).
fn place(root: &Path, dir: &Path, data_dir: &Path) -> Result<PathBuf, BackupError> {
    let invalid = |why: String| {
        BackupError::InvalidDir(format!("dir {:?}: {why}", dir.display().to_string()))
    };
    if dir.as_os_str().is_empty() {
        return Err(invalid(
            "must name a directory under the node's backup root".into(),
        ));
    }
    if !dir.is_relative() {
        return Err(invalid(
            "must be relative: it names a directory under the node's backup root ([storage] backup_root)".into(),
        ));
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("must not contain `..`".into()));
    }
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating the backup root {}", root.display()))?;
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving the backup root {}", root.display()))?;
    let resolved =
        resolve(&root.join(dir)).map_err(|e| invalid(format!("cannot be resolved: {e}")))?;
    if resolved == root || !resolved.starts_with(&root) {
        return Err(invalid(format!(
            "leads outside the backup root {} (through a symlink)",
            root.display()
        )));
    }
    let data = data_dir
        .canonicalize()
        .with_context(|| format!("resolving the data directory {}", data_dir.display()))?;
    if resolved.starts_with(&data) {
        return Err(invalid(format!(
            "is inside the node's data directory {}",
            data.display()
        )));
    }
    Ok(resolved)
}

/// Backs up `storage` (node `node_id`) into `dir`, an absolute path that [`place`] resolved,
/// absent or empty. On failure, what the backup wrote is removed again.
pub fn backup(
    storage: &Storage,
    node_id: u64,
    dir: &Path,
    cancelled: &AtomicBool,
) -> Result<Manifest, BackupError> {
    let started = Instant::now();
    let created = prepare_dir(dir)?;
    tracing::info!(dir = %dir.display(), "backup started");
    match copy_snapshot(storage, node_id, dir, cancelled) {
        Ok(manifest) => {
            tracing::info!(
                dir = %dir.display(),
                keyspaces = manifest.keyspaces.len(),
                pairs = manifest.pairs,
                bytes = manifest.bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "backup finished"
            );
            Ok(manifest)
        }
        Err(error) => {
            let error = match remove_partial(dir, created) {
                Ok(()) => error,
                Err(cleanup) => BackupError::Failed(anyhow!(
                    "{error}; removing the partial backup failed too ({cleanup:#}): remove {} by hand",
                    dir.display()
                )),
            };
            tracing::warn!(dir = %dir.display(), %error, "backup failed");
            Err(error)
        }
    }
}

/// Checks the backup directory and creates it if it is absent; answers whether it created it.
fn prepare_dir(dir: &Path) -> Result<bool, BackupError> {
    let invalid = |why: String| BackupError::InvalidDir(format!("dir {}: {why}", dir.display()));
    match std::fs::metadata(dir) {
        Ok(metadata) if !metadata.is_dir() => Err(invalid("is not a directory".into())),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dir).map_err(|e| invalid(format!("cannot be read: {e}")))?;
            if entries.next().is_some() {
                return Err(invalid(
                    "is not empty: a backup goes into a new or empty directory".into(),
                ));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| invalid(format!("cannot be created: {e}")))?;
            Ok(true)
        }
        Err(e) => Err(invalid(format!("cannot be read: {e}"))),
    }
}

/// An absolute path (without `..`) with its longest existing ancestor resolved (symlinks too).
fn resolve(dir: &Path) -> std::io::Result<PathBuf> {
    let mut existing = dir;
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut resolved = existing.canonicalize()?;
    resolved.extend(rest.iter().rev());
    Ok(resolved)
}

/// Removes what a failed backup wrote: the directory if it created it, else its contents
/// (it was empty before).
fn remove_partial(dir: &Path, created: bool) -> anyhow::Result<()> {
    if created {
        return std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()));
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Copies every keyspace at one snapshot into a new database in `dir`, checks each shard's
/// pairs against its recorded digest, then writes the manifest.
fn copy_snapshot(
    storage: &Storage,
    node_id: u64,
    dir: &Path,
    cancelled: &AtomicBool,
) -> Result<Manifest, BackupError> {
    let created_at = crate::clock::wall_now().to_string();
    let copied = storage
        .copy_to(dir, cancelled)?
        .ok_or(BackupError::ShuttingDown)?;
    let mut shards = Vec::new();
    for (shard, digest) in copied.iter().filter_map(|k| k.shard.as_ref()) {
        let ShardDigest { meta, recomputed } = digest;
        if *recomputed != meta.digest {
            return Err(BackupError::Failed(anyhow!(
                "shard {shard}: its pairs in the snapshot hash to {recomputed:016x}, but its \
                 state records digest {:016x} at applied index {}",
                meta.digest,
                meta.applied_index
            )));
        }
        shards.push(BackupShard {
            id: shard.0,
            applied_index: meta.applied_index,
            digest: format!("{:016x}", meta.digest),
        });
    }
    let keyspaces: Vec<BackupKeyspace> = copied
        .into_iter()
        .map(|k| BackupKeyspace {
            name: k.name,
            pairs: k.pairs,
            bytes: k.bytes,
        })
        .collect();
    let manifest = Manifest {
        format: Manifest::FORMAT,
        state_format: crate::storage::STATE_FORMAT,
        node: node_id,
        created_at,
        shards,
        pairs: keyspaces.iter().map(|k| k.pairs).sum(),
        bytes: keyspaces.iter().map(|k| k.bytes).sum(),
        keyspaces,
    };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// Writes the manifest durably: a temporary file, fsync, rename, fsync of the directory.
fn write_manifest(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let temporary = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    let text = serde_json::to_vec_pretty(manifest).context("encoding the manifest")?;
    file.write_all(&text)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dir.join(MANIFEST_FILE))
        .with_context(|| format!("renaming {}", temporary.display()))?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Reads a backup's manifest.
pub fn read_manifest(backup_dir: &Path) -> anyhow::Result<Manifest> {
    let path = backup_dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} has no {MANIFEST_FILE}: it is not a finished backup",
            backup_dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a backup manifest", path.display()))?;
    ensure!(
        manifest.format == Manifest::FORMAT,
        "{} has format {}; this node reads format {}",
        path.display(),
        manifest.format,
        Manifest::FORMAT
    );
    Ok(manifest)
}

/// Copies the backup in `backup_dir` into the data directory `data_dir` (absent or empty) of
/// node `node_id`, leaving the restore marker in it. The node then opens the data directory,
/// checks each recovered shard with [`verify_shard`] and calls [`finish_restore`].
pub fn restore(backup_dir: &Path, data_dir: &Path, node_id: u64) -> anyhow::Result<Manifest> {
    let manifest = read_manifest(backup_dir)?;
    ensure!(
        manifest.node == node_id,
        "the backup in {} is of node {}; this is node {node_id}",
        backup_dir.display(),
        manifest.node
    );
    let formats = OLDEST_MIGRATED_FORMAT..=STATE_FORMAT;
    ensure!(
        formats.contains(&manifest.state_format),
        "the backup in {} holds state format {}, but this oneid-node reads format {STATE_FORMAT} and migrates formats {OLDEST_MIGRATED_FORMAT} and later: restore it with the version that made it",
        backup_dir.display(),
        manifest.state_format,
    );
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => ensure!(
            entries.next().is_none(),
            "the data directory {} is not empty: a restore needs an absent or empty one",
            data_dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the data directory {}", data_dir.display()))
        }
    }
    let source = backup_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", backup_dir.display()))?;
    let data = data_dir.canonicalize()?;
    ensure!(
        !data.starts_with(&source),
        "the data directory {} is inside the backup {}",
        data.display(),
        source.display()
    );
    let marker = data_dir.join(RESTORE_MARKER);
    std::fs::write(&marker, format!("restoring {}\n", source.display()))
        .and_then(|()| std::fs::File::open(&marker)?.sync_all())
        .with_context(|| format!("writing {}", marker.display()))?;
    fsync_dir(data_dir)?;
    copy_tree(&source, data_dir, true)?;
    tracing::info!(backup = %source.display(), data = %data_dir.display(), created_at = %manifest.created_at, "backup copied into the data directory");
    Ok(manifest)
}

/// Copies a directory tree, fsyncing every file and directory; at the top, skips the manifest.
fn copy_tree(from: &Path, to: &Path, top: bool) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if top && (name == MANIFEST_FILE || name == RESTORE_MARKER) {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            copy_tree(&source, &target, false)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)
                .and_then(|_| std::fs::File::open(&target)?.sync_all())
                .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
        } else {
            bail!(
                "{} is neither a file nor a directory: not part of a backup",
                source.display()
            );
        }
    }
    fsync_dir(to)
}

/// Checks a recovered shard against the manifest: its applied index and digest as recorded,
/// and the digest recomputed from its pairs. Call before the shard's actor runs.
pub fn verify_shard(storage: &Storage, shard: ShardId, manifest: &Manifest) -> anyhow::Result<()> {
    let expected = manifest
        .shards
        .iter()
        .find(|s| s.id == shard.0)
        .ok_or_else(|| anyhow!("this node hosts shard {shard}, which the backup does not have"))?;
    let ShardDigest { meta, recomputed } = storage.state_digest(shard)?;
    let (recorded, recomputed) = (
        format!("{:016x}", meta.digest),
        format!("{recomputed:016x}"),
    );
    ensure!(
        meta.applied_index == expected.applied_index
            && recorded == expected.digest
            && recomputed == expected.digest,
        "shard {shard} does not match the backup: applied index {} (backup {}), digest {recorded} \
         recorded and {recomputed} recomputed (backup {})",
        meta.applied_index,
        expected.applied_index,
        expected.digest
    );
    Ok(())
}

/// After every hosted shard was verified: checks the backup has no other shard, and removes the
/// restore marker.
pub fn finish_restore(
    data_dir: &Path,
    manifest: &Manifest,
    hosted: &[ShardId],
) -> anyhow::Result<()> {
    if let Some(extra) = manifest
        .shards
        .iter()
        .find(|s| !hosted.contains(&ShardId(s.id)))
    {
        bail!(
            "the backup has shard {}, which this node does not host: the cluster file does not \
             match the backup",
            extra.id
        );
    }
    std::fs::remove_file(data_dir.join(RESTORE_MARKER)).context("removing the restore marker")?;
    fsync_dir(data_dir)?;
    tracing::info!(
        shards = manifest.shards.len(),
        created_at = %manifest.created_at,
        "restore verified: every shard's applied index and digest match the backup"
    );
    Ok(())
}

/// Refuses a data directory that holds a restore that was interrupted or did not verify.
pub fn check_no_unfinished_restore(data_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(RESTORE_MARKER);
    if marker.exists() {
        let what = std::fs::read_to_string(&marker).unwrap_or_default();
        bail!(
            "the data directory {} holds a restore that was interrupted or did not verify ({}): \
             empty it and start again with --restore",
            data_dir.display(),
            what.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::TempDir;
    use oneid_replica::write::{Space, WriteOp};
    use oneid_state::store::pair_hash;
    use oneid_state::{keys, ShardMeta};

    /// Two shards with a few pairs each, their meta records holding the right digests.
    fn populated(path: &Path) -> Storage {
        let hosted = [ShardId(0), ShardId(1)];
        let storage =
            Storage::open(path, 2, &hosted, StorageConfig::default()).expect("opening storage");
        let mut ops = vec![WriteOp::put(Space::Meta, "hs/0000", "hard")];
        for &shard in &hosted {
            let mut digest = 0u64;
            for n in 0..25_000u32 {
                let key = format!("p{n:08}").into_bytes();
                let value = format!("value {n} of shard {shard}").into_bytes();
                digest = digest.wrapping_add(pair_hash(&key, &value));
                ops.push(WriteOp::put(Space::State(shard), key, value));
            }
            let meta = ShardMeta {
                applied_index: 40 + u64::from(shard.0),
                digest,
                ..ShardMeta::default()
            };
            let meta = postcard::to_stdvec(&meta).expect("encode");
            ops.push(WriteOp::put(Space::State(shard), keys::META, meta));
            ops.push(WriteOp::put(Space::Log(shard), 7u64.to_be_bytes(), "entry"));
        }
        storage.write_for_test(ops);
        storage
    }

    #[test]
    #[allow(clippy::too_many_lines)]
    fn a_backup_restores_into_an_empty_directory_and_verifies() {
        let (data, backups, restored) = (
            TempDir::new("data"),
            TempDir::new("backups"),
            TempDir::new("restored"),
        );
        let storage = populated(&data.0);
        let dir = backups.0.join("b1");
        let manifest = backup(&storage, 3, &dir, &AtomicBool::new(false)).expect("backup");
        assert_eq!(manifest.format, 1);
        assert_eq!(manifest.node, 3);
        assert_eq!(
            manifest
                .shards
                .iter()
                .map(|s| (s.id, s.applied_index))
                .collect::<Vec<_>>(),
            vec![(0, 40), (1, 41)]
        );
        assert_eq!(
            manifest
                .keyspaces
                .iter()
                .map(|k| (k.name.as_str(), k.pairs))
                .collect::<Vec<_>>(),
            vec![
                ("log_0000", 1),
                ("log_0001", 1),
                ("meta", 1),
                ("state_0000", 25_001),
                ("state_0001", 25_001)
            ]
        );
        assert_eq!(manifest.pairs, 50_005);
        assert_eq!(read_manifest(&dir).expect("manifest"), manifest);

        // Not into a non-empty directory, nor twice into the same one.
        assert!(matches!(
            backup(&storage, 3, &dir, &AtomicBool::new(false)),
            Err(BackupError::InvalidDir(_))
        ));
        drop(storage);

        // Restored, the shards match the manifest.
        let target = restored.0.join("data");
        assert!(
            restore(&dir, &target, 4).is_err(),
            "a backup of another node"
        );
        // A manifest from before the state format field: format 1, refused before copying.
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).expect("manifest");
        let old = text.replace(
            &format!("\"state_format\": {},", crate::storage::STATE_FORMAT),
            "",
        );
        assert_ne!(old, text);
        std::fs::write(dir.join(MANIFEST_FILE), &old).expect("writing");
        let error = restore(&dir, &target, 3).unwrap_err().to_string();
        assert!(error.contains("holds state format 1"), "{error}");
        assert!(!target.exists(), "nothing copied");
        std::fs::write(dir.join(MANIFEST_FILE), &text).expect("writing");
        let manifest = restore(&dir, &target, 3).expect("restore");
        assert!(target.join(RESTORE_MARKER).exists());
        assert!(check_no_unfinished_restore(&target).is_err());
        let storage = Storage::open(
            &target,
            2,
            &[ShardId(0), ShardId(1)],
            StorageConfig::default(),
        )
        .expect("opening");
        for shard in [ShardId(0), ShardId(1)] {
            verify_shard(&storage, shard, &manifest).expect("the shard matches");
        }
        let mut wrong = manifest.clone();
        wrong.shards[1].applied_index += 1;
        assert!(verify_shard(&storage, ShardId(1), &wrong).is_err());
        let mut wrong = manifest.clone();
        wrong.shards[0].digest = format!("{:016x}", 1u64);
        assert!(verify_shard(&storage, ShardId(0), &wrong).is_err());
        assert!(finish_restore(&target, &manifest, &[ShardId(0)]).is_err());
        finish_restore(&target, &manifest, &[ShardId(0), ShardId(1)]).expect("finished");
        check_no_unfinished_restore(&target).expect("no marker left");
        drop(storage);

        // Not into a non-empty data directory.
        assert!(restore(&dir, &target, 3).is_err());
    }

    #[test]
    fn a_cancelled_backup_removes_what_it_wrote() {
        let (data, backups) = (TempDir::new("data"), TempDir::new("backups"));
        let storage = populated(&data.0);
        let dir = backups.0.join("b1");
        let outcome = backup(&storage, 1, &dir, &AtomicBool::new(true));
        assert!(matches!(outcome, Err(BackupError::ShuttingDown)));
        assert!(!dir.exists());
        // Into an existing empty directory: the directory stays, empty.
        let outcome = backup(&storage, 1, &backups.0, &AtomicBool::new(true));
        assert!(matches!(outcome, Err(BackupError::ShuttingDown)));
        assert_eq!(std::fs::read_dir(&backups.0).expect("read").count(), 0);
    }

    #[test]
    fn one_backup_at_a_time() {
        let data = TempDir::new("data");
        let storage = Arc::new(
            Storage::open(&data.0, 1, &[ShardId(0)], StorageConfig::default()).expect("opening"),
        );
        let off = Backups::new(Arc::clone(&storage), 1, data.0.clone(), None);
        assert!(matches!(off.begin(), Err(BackupError::Forbidden)));
        let backups = Backups::new(storage, 1, data.0.clone(), Some(data.0.join("b")));
        let running = backups.begin().expect("the first");
        assert!(matches!(backups.begin(), Err(BackupError::Busy)));
        drop(running);
        let running = backups.begin().expect("after the first finished");
        drop(running);
        backups.cancel();
        assert!(matches!(backups.begin(), Err(BackupError::ShuttingDown)));
    }

    #[test]
    fn a_backup_goes_only_under_the_root_with_symlinks_resolved() {
        let scratch = TempDir::new("place");
        let (root, data, outside) = (
            scratch.0.join("backups"),
            scratch.0.join("data"),
            scratch.0.join("outside"),
        );
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let real = |p: &Path| p.canonicalize().expect("resolves");
        let refused = |dir: &str| match place(&root, Path::new(dir), &data) {
            Err(BackupError::InvalidDir(message)) => message,
            other => panic!("{dir}: expected InvalidDir, got {other:?}"),
        };
        // The root is created on first use; the backup's path is resolved under it.
        assert_eq!(
            place(&root, Path::new("nightly/b1"), &data).expect("placed"),
            real(&scratch.0).join("backups/nightly/b1")
        );
        assert!(root.is_dir());
        assert!(refused("/tmp/b").contains("must be relative"));
        assert!(refused("").contains("must name a directory"));
        assert!(refused("../outside").contains("`..`"));
        assert!(refused(".").contains("outside the backup root"));
        // A symlink under the root leading out of it, to a directory or to the data.
        std::os::unix::fs::symlink(&outside, root.join("away")).expect("symlink");
        std::os::unix::fs::symlink(&data, root.join("data")).expect("symlink");
        assert!(refused("away/b").contains("outside the backup root"));
        assert!(refused("data/b").contains("outside the backup root"));
        // A root that holds the data directory still keeps backups out of it.
        let wide = place(&scratch.0, Path::new("data/b"), &data);
        assert!(matches!(wide, Err(BackupError::InvalidDir(m)) if m.contains("data directory")));
        assert_eq!(std::fs::read_dir(&outside).expect("read").count(), 0);
    }
}
