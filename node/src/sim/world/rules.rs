//! Rules changes in the simulation, as `PUT /v1/rules` makes them: now and then a client has
//! the registry shard order one of two rule sets (`DefineRules`, through whichever replica of
//! shard 0 it reaches), and clients install what the registry ordered on the other shards
//! (`InstallRules` with the registry's version, through whichever replica they reach), as the
//! API does after the registry answered, and again until every shard has it, as a client
//! sends a PUT answered 503 again. A third of the installs are of an older version (a slow
//! PUT's, overtaken by a later one), and once the cluster settled every shard is sent one
//! more, late. Settled, every replica of every shard holds the registry's newest version and
//! its rules, whatever the order its installs arrived in.

use super::segments;
use super::World;
use oneid_protocol::ids::ShardId;
use oneid_protocol::rules::Rules;
use oneid_replica::Effects;
use oneid_state::command::{Command, REGISTRY_SHARD};

/// The two rule sets clients define: the simulation's own, and the same earning twice.
fn rule_set(second: bool) -> Rules {
    let mut rules = segments::rules();
    if second {
        rules.per_currency_unit = 2.into();
    }
    rules
}

impl World {
    /// A client's PUT: the registry orders one of the two rule sets (fire and forget: a
    /// replica that does not lead drops it).
    pub(super) fn define_rules(&mut self) {
        let registry = ShardId(REGISTRY_SHARD);
        let hosts = self.up_hosts(registry);
        if hosts.is_empty() {
            return;
        }
        let node = hosts[self.rng.usize(0..hosts.len())];
        let rules = rule_set(self.rng.bool());
        let mut fx = Effects::default();
        self.replica(node, registry)
            .propose(&Command::DefineRules(Box::new(rules)), None, &mut fx);
        self.advance(node, registry, fx);
    }

    /// The newest version the registry was seen to order, with its rules (what a replica of
    /// the registry applied is remembered, so a registry that went back would be caught).
    fn ordered_rules(&mut self) -> Option<(u64, Rules)> {
        let registry = ShardId(REGISTRY_SHARD);
        let applied = self
            .hosts(registry)
            .into_iter()
            .filter_map(|n| self.nodes[n].replicas.get(&registry))
            .map(|replica| &replica.state)
            .max_by_key(|state| state.rules_version())
            .filter(|state| state.rules_version() > 0)
            .map(|state| (state.rules_version(), state.rules().clone()));
        if let Some((version, rules)) = applied {
            self.rules_ordered.entry(version).or_insert(rules);
        }
        self.rules_ordered
            .last_key_value()
            .map(|(version, rules)| (*version, rules.clone()))
    }

    /// Installs what the registry ordered on every shard whose replica (one an up node
    /// hosts, chosen at random) holds an older version; one install in three is of an
    /// earlier version (a slow PUT's), as long as there was one.
    pub(super) fn install_rules(&mut self) {
        let Some(newest) = self.ordered_rules() else {
            return;
        };
        for shard in (0..self.shape.shards).map(ShardId) {
            if shard.0 == REGISTRY_SHARD {
                continue;
            }
            let overtaken = if self.rng.u64(0..3) == 0 {
                self.earlier_rules()
            } else {
                None
            };
            match overtaken {
                // A slow PUT's install, overtaken: sent whatever the shard holds.
                Some((version, rules)) => self.propose_install(shard, version, rules, |_| true),
                None => {
                    let (version, rules) = newest.clone();
                    self.propose_install(shard, version, rules, |held| held < version);
                }
            }
        }
    }

    /// A version the registry ordered before its newest, at random.
    fn earlier_rules(&mut self) -> Option<(u64, Rules)> {
        let earlier = self.rules_ordered.len().checked_sub(1).filter(|n| *n > 0)?;
        let (version, rules) = self.rules_ordered.iter().nth(self.rng.usize(0..earlier))?;
        Some((*version, rules.clone()))
    }

    /// Proposes `InstallRules` at a random up replica of `shard` if `wanted` of the version it
    /// holds (fire and forget).
    fn propose_install(
        &mut self,
        shard: ShardId,
        version: u64,
        rules: Rules,
        wanted: impl Fn(u64) -> bool,
    ) {
        let hosts = self.up_hosts(shard);
        if hosts.is_empty() {
            return;
        }
        let node = hosts[self.rng.usize(0..hosts.len())];
        let held = match self.nodes[node].replicas.get(&shard) {
            Some(replica) => replica.state.rules_version(),
            None => return,
        };
        if !wanted(held) {
            return;
        }
        let install = Command::InstallRules {
            version,
            rules: Box::new(rules),
        };
        let mut fx = Effects::default();
        self.replica(node, shard).propose(&install, None, &mut fx);
        self.advance(node, shard, fx);
    }

    /// Once the cluster settled (the first time): sends every shard's leader an install of
    /// the earliest version the registry ordered, as a slow PUT's install that lands last.
    /// Answers whether it sent any (the cluster must then settle again).
    pub(super) fn send_late_install(&mut self) -> bool {
        if self.late_install.is_some() {
            return false;
        }
        let newest = self.ordered_rules().map_or(0, |(version, _)| version);
        self.late_install = Some(newest);
        let Some((version, rules)) = self
            .rules_ordered
            .first_key_value()
            .map(|(v, r)| (*v, r.clone()))
        else {
            return false;
        };
        for shard in (0..self.shape.shards).map(ShardId) {
            let leader = self.up_hosts(shard).into_iter().find(|n| {
                self.nodes[*n].replicas[&shard].status().role == oneid_replica::Role::Leader
            });
            if let Some(node) = leader {
                let install = Command::InstallRules {
                    version,
                    rules: Box::new(rules.clone()),
                };
                let mut fx = Effects::default();
                self.replica(node, shard).propose(&install, None, &mut fx);
                self.advance(node, shard, fx);
            }
        }
        true
    }

    /// Whether installs are still sent in the settling cluster: until the late install, and
    /// after it for a version the registry ordered since (a definition that was in flight).
    pub(super) fn reinstall_wanted(&mut self) -> bool {
        match self.late_install {
            None => true,
            Some(then) => self
                .ordered_rules()
                .is_some_and(|(version, _)| version > then),
        }
    }

    /// Whether every replica of every shard holds the registry's newest version.
    pub(super) fn rules_installed(&mut self) -> bool {
        let newest = self.ordered_rules().map_or(0, |(version, _)| version);
        (0..self.shape.shards).map(ShardId).all(|shard| {
            self.hosts(shard).into_iter().all(|n| {
                self.nodes[n]
                    .replicas
                    .get(&shard)
                    .is_some_and(|replica| replica.state.rules_version() == newest)
            })
        })
    }

    /// Once settled: every replica holds the registry's newest version and its rules.
    pub(super) fn check_rules(&mut self) -> Result<(), String> {
        if let Some(mismatch) = self.rules_mismatch() {
            return Err(mismatch);
        }
        if !self.rules_ordered.is_empty() {
            self.cover("rules redefined and installed on every shard");
        }
        if self.rules_ordered.len() > 1 {
            self.cover("a late install of older rules changed nothing");
        }
        Ok(())
    }

    /// A replica that does not hold the registry's newest version and its rules, described.
    pub(super) fn rules_mismatch(&mut self) -> Option<String> {
        let (version, rules) = self.ordered_rules()?;
        (0..self.shape.shards).map(ShardId).find_map(|shard| {
            self.hosts(shard).into_iter().find_map(|n| {
                let state = &self.nodes[n].replicas.get(&shard)?.state;
                ((state.rules_version(), state.rules()) != (version, &rules)).then(|| {
                    format!(
                        "shard {shard} on node {}: rules version {} while the registry ordered {version} last, or other rules",
                        n + 1,
                        state.rules_version()
                    )
                })
            })
        })
    }
}
