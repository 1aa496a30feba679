//! Identities: the bindings of the shard's slice of the identity index (`Bind`, claimed once
//! and never changed), what an event's identities resolve to (the target profile and the
//! identities it takes), and the follow-ups that bind the others at their own shards.

use super::*;

impl ShardState {
    pub(super) fn apply_bind(
        &mut self,
        tx: &mut Tx<'_>,
        identity: Identity,
        oneid: OneId,
    ) -> BindOutcome {
        assert_eq!(
            identity.shard(self.n_shards),
            self.shard,
            "identity routed to the wrong shard"
        );
        let key = keys::identity(&identity);
        match tx.get_as::<OneId>(&key) {
            Some(bound) if bound == oneid => BindOutcome::Bound,
            Some(other) => BindOutcome::Conflict(other),
            None => {
                tx.put_new(key, &oneid);
                BindOutcome::Bound
            }
        }
    }

    /// Finishes follow-ups with their binds' answers: a bound identity is listed on its
    /// profile, a conflict ends the follow-up unlisted, and either way the record goes. An
    /// answer for a record already finished (both the router and the leader's sweep drove it)
    /// changes nothing.
    pub(super) fn finish_follow_ups(&mut self, tx: &mut Tx<'_>, answers: Vec<FollowUpAnswer>) {
        let mut links: BTreeMap<OneId, Vec<Identity>> = BTreeMap::new();
        for FollowUpAnswer { seq, outcome } in answers {
            let key = keys::follow_up(seq);
            let Some(bytes) = tx.get(&key) else {
                continue;
            };
            let record: FollowUpRecord = decode(&key, &bytes);
            tx.delete_known(key, &bytes);
            assert!(
                self.record.follow_ups_pending > 0,
                "shard {}: a follow-up record beyond the pending count",
                self.shard
            );
            self.record.follow_ups_pending -= 1;
            if outcome == BindOutcome::Bound {
                links.entry(record.oneid).or_default().push(record.identity);
            }
        }
        for (oneid, identities) in links {
            self.apply_link(tx, oneid, identities);
        }
    }

    /// Lists identities (bound to `oneid` by their shards) on the profile. Idempotent; values
    /// past the identity limit are not listed.
    pub(super) fn apply_link(&mut self, tx: &mut Tx<'_>, oneid: OneId, identities: Vec<Identity>) {
        assert_eq!(oneid.shard(), self.shard, "link routed to the wrong shard");
        let Some((mut profile, stored_hash)) = self.load_profile(tx, oneid) else {
            return;
        };
        let before = self.stamp(&profile);
        let mut changed = false;
        for identity in identities {
            if profile.identity_count() >= IDENTITIES_PER_PROFILE_MAX {
                break;
            }
            changed |= profile
                .identities
                .entry(identity.kind)
                .or_default()
                .insert(identity.value);
        }
        if changed {
            profile.version += 1;
            self.finish_profile(tx, profile, Some(stored_hash), before.as_ref());
        } else {
            self.activations.insert(profile, stored_hash);
        }
    }

    /// The event's identities held by this shard, each with the profile it is bound to (the
    /// router's word for those it found bound to the target, else read).
    pub(super) fn local_identities(
        &self,
        tx: &Tx<'_>,
        event: &Event,
        target: Target,
        known_bound: &[bool],
    ) -> Vec<(Identity, Option<OneId>)> {
        event
            .identities
            .iter()
            .enumerate()
            .filter(|(_, identity)| identity.shard(self.n_shards) == self.shard)
            .map(|(i, identity)| {
                let bound = match target {
                    Target::Existing(oneid) if known_bound.get(i) == Some(&true) => {
                        debug_assert_eq!(
                            tx.get_as::<OneId>(&keys::identity(identity)),
                            Some(oneid),
                            "the router's binding of {identity:?}"
                        );
                        Some(oneid)
                    }
                    _ => tx.get_as::<OneId>(&keys::identity(identity)),
                };
                (identity.clone(), bound)
            })
            .collect()
    }

    /// The profile the event applies to, with the pair hash of its stored bytes (`None`: a new
    /// profile, minted from the shard's counter), or the outcome that ends the event here: a
    /// duplicate, identities of two profiles, a profile linked elsewhere meanwhile, or none.
    pub(super) fn target_profile(
        &mut self,
        tx: &Tx<'_>,
        event: &Event,
        target: Target,
        local: &[(Identity, Option<OneId>)],
    ) -> Result<(Profile, Option<u64>), EventOutcome> {
        let mut bound: BTreeSet<OneId> = local.iter().filter_map(|(_, oneid)| *oneid).collect();
        if let Target::Existing(oneid) = target {
            assert_eq!(oneid.shard(), self.shard, "event routed to the wrong shard");
            bound.insert(oneid);
        }
        if bound.len() > 1 {
            // A retry of an event that applied is a duplicate, whatever happened to its
            // identities since (another profile may have taken one of them first).
            if let Some(&oneid) = bound.iter().find(|oneid| {
                oneid.shard() == self.shard
                    && tx.get(&keys::dedup(**oneid, &event.event_id)).is_some()
            }) {
                return Err(EventOutcome::Duplicate(oneid));
            }
        }
        let mut bound = bound.into_iter();
        let (first, second) = (bound.next(), bound.next());
        if let (Some(a), Some(b)) = (first, second) {
            return Err(EventOutcome::Rejected(reject_field(
                ErrorCode::IdentityConflict,
                "identities",
                format!("the event's identities belong to two profiles, {a} and {b}"),
            )));
        }
        match first {
            // Linked on another shard after the router resolved it: the retry routes there.
            Some(oneid) if oneid.shard() != self.shard => Err(EventOutcome::Rejected(reject(
                ErrorCode::Unavailable,
                format!("an identity of the event was just linked to {oneid}; retry"),
            ))),
            Some(oneid) => match self.load_profile(tx, oneid) {
                Some((profile, stored_hash)) => Ok((profile, Some(stored_hash))),
                None => Err(EventOutcome::Rejected(reject_field(
                    ErrorCode::NotFound,
                    "oneid",
                    format!("profile {oneid} does not exist"),
                ))),
            },
            None => {
                let oneid = OneId::mint(self.shard, self.record.profile_seq + 1);
                Ok((Profile::new(oneid, &self.rules, event.ts), None))
            }
        }
    }

    /// Lists the event's unbound identities held here on the profile (answered: those to
    /// bind now), and answers those held by other shards and not listed yet (bound there
    /// after this event applies, driven by follow-up records), within the profile's identity
    /// limit and the shard's limit of follow-ups pending.
    pub(super) fn take_identities<'l>(
        &self,
        profile: &mut Profile,
        local: &'l [(Identity, Option<OneId>)],
        link_elsewhere: Vec<Identity>,
    ) -> Result<(Vec<&'l Identity>, Vec<Identity>), EventError> {
        let mut new_bindings = Vec::new();
        for (identity, _) in local.iter().filter(|(_, bound)| bound.is_none()) {
            if profile
                .identities
                .entry(identity.kind.clone())
                .or_default()
                .insert(identity.value.clone())
            {
                new_bindings.push(identity);
            }
        }
        let to_link: Vec<Identity> = link_elsewhere
            .into_iter()
            .filter(|id| {
                !profile
                    .identities
                    .get(&id.kind)
                    .is_some_and(|v| v.contains(&id.value))
            })
            .collect();
        if profile.identity_count() + to_link.len() > IDENTITIES_PER_PROFILE_MAX {
            return Err(reject_field(
                ErrorCode::IdentityLimit,
                "identities",
                format!("a profile holds at most {IDENTITIES_PER_PROFILE_MAX} identity values"),
            ));
        }
        if self.record.follow_ups_pending + to_link.len() as u64 > FOLLOW_UPS_PENDING_MAX {
            return Err(reject(
                ErrorCode::Unavailable,
                format!(
                    "shard {} has {FOLLOW_UPS_PENDING_MAX} identity bindings waiting for other shards; retry",
                    self.shard
                ),
            ));
        }
        Ok((new_bindings, to_link))
    }

    /// Writes a follow-up record for each identity to bind on another shard.
    pub(super) fn file_follow_ups(
        &mut self,
        tx: &mut Tx<'_>,
        oneid: OneId,
        to_link: Vec<Identity>,
        follow_ups: &mut Vec<FollowUp>,
    ) {
        for identity in to_link {
            self.record.follow_up_seq += 1;
            self.record.follow_ups_pending += 1;
            let seq = self.record.follow_up_seq;
            let record = FollowUpRecord {
                oneid,
                identity,
                at: self.record.clock,
            };
            tx.put_new(keys::follow_up(seq), &record);
            follow_ups.push(FollowUp {
                seq,
                oneid,
                identity: record.identity,
            });
        }
    }
}
