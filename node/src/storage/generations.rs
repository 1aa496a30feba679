//! Generations of a shard's keyspaces: a snapshot install stages the next generation beside
//! the current one and switches to it atomically (see the module above); at open any other
//! generation is dropped.

use super::writer::stop;
use super::{Pair, Storage};
use fjall::{Keyspace, KeyspaceCreateOptions};
use oneid_protocol::ids::ShardId;
use oneid_replica::log::generation_key;
use oneid_replica::write::Space;
use std::sync::atomic::Ordering;

/// The keyspaces of a shard's current generation.
#[derive(Clone)]
pub(super) struct Generation {
    pub(super) number: u64,
    pub(super) log: Keyspace,
    pub(super) state: Keyspace,
}

/// A keyspace of the node, by name, with the shard and generation it belongs to (if a shard's).
pub(super) struct NamedKeyspace {
    pub name: String,
    pub shard: Option<(ShardId, u64)>,
    pub keyspace: Keyspace,
}

/// The names of a shard's log and state keyspaces in `generation`.
pub(super) fn generation_names(shard: ShardId, generation: u64) -> (String, String) {
    let suffix = match generation {
        0 => String::new(),
        g => format!("_g{g}"),
    };
    (
        format!("log_{:04}{suffix}", shard.0),
        format!("state_{:04}{suffix}", shard.0),
    )
}

/// The shard and generation a keyspace name belongs to, if it is a shard's.
pub(super) fn parse_generation_name(name: &str) -> Option<(ShardId, u64)> {
    let rest = name
        .strip_prefix("state_")
        .or_else(|| name.strip_prefix("log_"))?;
    let (shard, generation) = match rest.split_once("_g") {
        Some((shard, generation)) => (shard, generation.parse().ok()?),
        None => (rest, 0),
    };
    (shard.len() == 4).then_some(())?;
    Some((ShardId(shard.parse().ok()?), generation))
}

/// The state keyspace of a staged generation (see [`Storage::stage`]).
#[derive(Clone)]
pub struct StagedState(Keyspace);

impl Storage {
    pub(super) fn generation(&self, shard: ShardId) -> Generation {
        self.shards[shard.0 as usize]
            .as_ref()
            .expect("shard is hosted here")
            .read()
            .expect("generation lock")
            .clone()
    }

    pub(super) fn generations(&self) -> impl Iterator<Item = Generation> + '_ {
        self.shards
            .iter()
            .flatten()
            .map(|g| g.read().expect("generation lock").clone())
    }

    /// The shard's log keyspace, of its current generation.
    pub(super) fn log(&self, shard: ShardId) -> Keyspace {
        self.generation(shard).log
    }

    /// The shard's state keyspace, of its current generation.
    pub(super) fn state(&self, shard: ShardId) -> Keyspace {
        self.generation(shard).state
    }

    /// The shard's current generation.
    pub fn generation_number(&self, shard: ShardId) -> u64 {
        self.generation(shard).number
    }

    /// The generation `gen/NNNN` records for `shard` as `view` sees it.
    pub(super) fn recorded_generation(&self, view: &fjall::Snapshot, shard: ShardId) -> u64 {
        use fjall::Readable as _;
        view.get(&self.meta, generation_key(shard))
            .unwrap_or_else(|e| panic!("reading meta failed: {e}"))
            .map_or(0, |bytes| {
                u64::from_be_bytes(bytes.as_ref().try_into().expect("a generation record"))
            })
    }

    /// The keyspaces this node reads, sorted by name: `meta`, and each hosted shard's log and
    /// state of its current generation (each with the shard and generation it belongs to).
    #[cfg(test)]
    pub(crate) fn keyspace_names(&self) -> Vec<String> {
        self.keyspaces().into_iter().map(|k| k.name).collect()
    }

    pub(super) fn keyspaces(&self) -> Vec<NamedKeyspace> {
        let named = |name: String, shard, keyspace| NamedKeyspace {
            name,
            shard,
            keyspace,
        };
        let mut all = vec![named("meta".to_string(), None, self.meta.clone())];
        for (shard, generation) in self.shards.iter().enumerate() {
            let Some(generation) = generation else {
                continue;
            };
            let g = generation.read().expect("generation lock").clone();
            let shard = ShardId(shard as u32);
            let (log, state) = generation_names(shard, g.number);
            all.push(named(log, Some((shard, g.number)), g.log));
            all.push(named(state, Some((shard, g.number)), g.state));
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Creates the keyspaces of a new generation of `shard`, empty, for a snapshot to be
    /// written into: the shard goes on reading and writing its current one until
    /// [`Storage::switch`]. Answers the generation and its state keyspace.
    pub fn stage(&self, shard: ShardId) -> anyhow::Result<(u64, StagedState)> {
        let number = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (log, state) = generation_names(shard, number);
        let options = || self.keyspace_options();
        self.db.keyspace(&log, options)?;
        Ok((number, StagedState(self.db.keyspace(&state, options)?)))
    }

    /// Writes `pairs` into a staged state in one batch of their own (not the writer's), then
    /// seals its memtable if full, as the writer does. Not durable until [`Storage::sync_all`].
    pub fn write_staged(&self, staged: &StagedState, pairs: Vec<Pair>) -> anyhow::Result<()> {
        self.write_pairs(&staged.0, pairs)
    }

    /// Writes `pairs` into `keyspace` in one batch of their own, then seals its memtable if
    /// full (as the writer does, so fjall's flush workers never wait on their own queue).
    pub(super) fn write_pairs(&self, keyspace: &Keyspace, pairs: Vec<Pair>) -> anyhow::Result<()> {
        let mut batch = self.db.batch();
        for (key, value) in pairs {
            batch.insert(keyspace, key, value);
        }
        batch.commit()?;
        self.seal_if_full(keyspace)?;
        Ok(())
    }

    /// The shards this node hosts, in order.
    pub(super) fn hosted(&self) -> Vec<ShardId> {
        (0..self.shards.len() as u32)
            .map(ShardId)
            .filter(|s| self.shards[s.0 as usize].is_some())
            .collect()
    }

    /// Drops a staged generation that will not be switched to.
    pub fn discard(&self, shard: ShardId, number: u64) -> anyhow::Result<()> {
        assert_ne!(
            number,
            self.generation_number(shard),
            "shard {shard}: discarding its current generation"
        );
        let (log, state) = generation_names(shard, number);
        for name in [log, state] {
            let keyspace = self.db.keyspace(&name, KeyspaceCreateOptions::default)?;
            self.db.delete_keyspace(keyspace)?;
        }
        Ok(())
    }

    /// The write recording generation `number` of `shard` is durable: reads and writes go to
    /// its keyspaces from now on, and the old generation is dropped (its files go once the
    /// last reader lets go of them; an error here leaves them for the next start to drop).
    /// The caller has no write of the shard in flight. A node that cannot open the new
    /// generation stops: its meta record already names it.
    pub fn switch(&self, shard: ShardId, number: u64) -> anyhow::Result<()> {
        let (log, state) = generation_names(shard, number);
        let open = |name: &str| {
            self.db
                .keyspace(name, || self.keyspace_options())
                .unwrap_or_else(|error| stop("opening a switched-to generation", &error))
        };
        let new = Generation {
            number,
            log: open(&log),
            state: open(&state),
        };
        let old = std::mem::replace(
            &mut *self.shards[shard.0 as usize]
                .as_ref()
                .expect("shard is hosted here")
                .write()
                .expect("generation lock"),
            new,
        );
        assert!(old.number < number, "shard {shard}: generations only go up");
        self.db.delete_keyspace(old.log)?;
        self.db.delete_keyspace(old.state)?;
        Ok(())
    }

    /// The keyspace of `space` in generation `number` of its shard, which a job switching to
    /// it writes (the shard still reads its current one until the job is durable).
    pub(super) fn switching_keyspace(&self, space: Space, number: u64) -> Keyspace {
        let (Space::Log(shard) | Space::State(shard)) = space else {
            unreachable!("only a shard's keyspaces have generations")
        };
        let (log, state) = generation_names(shard, number);
        let name = if matches!(space, Space::Log(_)) {
            log
        } else {
            state
        };
        self.db
            .keyspace(&name, || self.keyspace_options())
            .unwrap_or_else(|error| stop("opening a staged generation", &error))
    }

    pub(super) fn keyspace(&self, space: Space) -> Keyspace {
        match space {
            Space::Meta => self.meta.clone(),
            Space::Log(shard) => self.log(shard),
            Space::State(shard) => self.state(shard),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::TempDir;

    #[test]
    fn a_generation_switch_survives_a_reopen_and_unswitched_ones_are_dropped() {
        let dir = TempDir::new("generations");
        let shard = ShardId(0);
        let open =
            || Storage::open(&dir.0, 1, &[shard], StorageConfig::default()).expect("opening");
        let storage = open();
        storage
            .state(shard)
            .insert("k", "gen 0")
            .expect("inserting");
        let (one, staged) = storage.stage(shard).expect("staging");
        storage
            .write_staged(&staged, vec![(b"k".to_vec(), b"gen 1".to_vec())])
            .expect("writing");
        let (two, abandoned) = storage.stage(shard).expect("staging");
        storage
            .write_staged(&abandoned, vec![(b"k".to_vec(), b"gen 2".to_vec())])
            .expect("writing");
        assert_eq!((one, two), (1, 2));
        // The switch: the meta record first (as the install's write), then the handles.
        storage
            .meta
            .insert(generation_key(shard), one.to_be_bytes())
            .expect("inserting");
        storage.switch(shard, one).expect("switching");
        let value = |s: &Storage| s.state(shard).get("k").expect("reads").map(|v| v.to_vec());
        assert_eq!(value(&storage), Some(b"gen 1".to_vec()));
        storage.sync_all().expect("syncing");
        drop((staged, abandoned, storage));
        let reopened = open();
        assert_eq!(reopened.generation_number(shard), 1);
        assert_eq!(value(&reopened), Some(b"gen 1".to_vec()));
        let names: Vec<String> = reopened.keyspaces().into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["log_0000_g1", "meta", "state_0000_g1"]);
        let mut on_disk: Vec<String> = reopened
            .db
            .list_keyspace_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, ["log_0000_g1", "meta", "state_0000_g1"]);
        // The next staging takes a generation above every one seen.
        assert_eq!(reopened.stage(shard).expect("staging").0, 3);
    }
}
