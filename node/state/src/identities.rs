//! Identities: the bindings of the shard's slice of the identity index (`Bind`, claimed once;
//! nothing changes one yet, and the binding epoch is what will say so), what an event's
//! identities resolve to under the identity policy (the target profile, the identities it
//! takes within the limits, and those it does not link), and the follow-ups that bind the
//! others at their own shards.

use super::*;
use crate::command::Found;
use crate::unlink::Unlinked;
use oneid_protocol::api::{NotLinked, NotLinkedReason};
use oneid_protocol::policy::IdentityPolicy;

/// Most pending links of a profile an event reads. An event of this format files none past
/// the profile's limits and none twice, so a profile has at most
/// [`IDENTITIES_PER_PROFILE_MAX`]; events of older formats still in a migrated log may have
/// filed more, which this bound then undercounts (never past the read).
const PENDING_LINKS_READ_MAX: usize = 4 * IDENTITIES_PER_PROFILE_MAX;

/// The event's identities as apply sees them (see [`ShardState::sight`]).
pub(super) struct Sighting<'e> {
    /// The identities not blocked, in the event's order, each with its binding.
    live: Vec<(&'e Identity, Binding)>,
    /// For each of `live`, the profile the router found it bound to, if any.
    routed: Vec<Option<OneId>>,
    /// The blocked ones.
    not_linked: Vec<NotLinked>,
    /// Whether the identity policy holds (not for events of older formats).
    policy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binding {
    /// Held by this shard's index: the profile it is bound to.
    Here(Option<OneId>),
    /// Held by another shard's: what the router found.
    Elsewhere(Found),
}

/// What an event's identities give its profile.
#[derive(Default)]
pub(super) struct Taken {
    /// Held here: bound by this apply.
    pub(super) new_bindings: Vec<Identity>,
    /// Held by other shards: bound there by follow-ups.
    pub(super) to_link: Vec<Identity>,
    /// Sorted by (kind, value).
    pub(super) not_linked: Vec<NotLinked>,
}

/// The identity policy's limits as an event's identities are taken: what the profile holds
/// and has pending, per kind and in all.
struct Limits {
    per_kind: BTreeMap<String, usize>,
    total: usize,
}

impl Limits {
    fn new(profile: &Profile, pending: &BTreeSet<Identity>) -> Limits {
        let mut per_kind: BTreeMap<String, usize> = profile
            .identities
            .iter()
            .map(|(kind, values)| (kind.clone(), values.len()))
            .collect();
        let mut total = profile.identity_count();
        for identity in pending.iter().filter(|id| !profile.holds(id)) {
            *per_kind.entry(identity.kind.clone()).or_default() += 1;
            total += 1;
        }
        Limits { per_kind, total }
    }

    /// Counts `identity` in, or answers the limit it would pass.
    fn admit(
        &mut self,
        identity: &Identity,
        policy: &IdentityPolicy,
    ) -> Result<(), NotLinkedReason> {
        let of_kind = self.per_kind.entry(identity.kind.clone()).or_default();
        if policy
            .max_per_profile(&identity.kind)
            .is_some_and(|max| *of_kind >= max as usize)
        {
            return Err(NotLinkedReason::KindLimit);
        }
        if self.total >= IDENTITIES_PER_PROFILE_MAX {
            return Err(NotLinkedReason::IdentityLimit);
        }
        *of_kind += 1;
        self.total += 1;
        Ok(())
    }
}

fn not_linked(identity: &Identity, reason: NotLinkedReason) -> NotLinked {
    NotLinked {
        kind: identity.kind.clone(),
        value: identity.value.clone(),
        reason,
    }
}

/// An event whose mergeable identities name two profiles at apply (bound since its router
/// resolved them, which would have merged them): `unavailable`, so that it is sent again and
/// resolved anew; then its router merges them.
fn conflict(a: OneId, b: OneId) -> EventError {
    let (a, b) = (a.min(b), a.max(b));
    reject(
        ErrorCode::Unavailable,
        format!("the event's identities were bound to two profiles, {a} and {b}, since it was routed; retry"),
    )
}

impl Sighting<'_> {
    /// No identities: an event that reaches its profile by `oneid` alone.
    pub(super) fn none() -> Sighting<'static> {
        Sighting {
            live: Vec::new(),
            routed: Vec::new(),
            not_linked: Vec::new(),
            policy: true,
        }
    }
}

impl ShardState {
    /// The key of `identity` in this shard's slice of the identity index; it must be this
    /// shard's.
    pub(super) fn index_key(&self, identity: &Identity) -> Vec<u8> {
        assert_eq!(
            identity.shard(self.n_shards),
            self.shard,
            "identity routed to the wrong shard"
        );
        keys::identity(identity)
    }

    pub(super) fn apply_bind(
        &mut self,
        tx: &mut Tx<'_>,
        identity: Identity,
        oneid: OneId,
    ) -> BindOutcome {
        let key = self.index_key(&identity);
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
    /// profile, a conflict (another profile took it first: `taken`, which the driver counts)
    /// ends the follow-up unlisted, and either way the record and its pending link go. An
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
            if record.unbind {
                self.unbound(tx, record.oneid, &record.identity);
            } else {
                tx.delete_known(keys::pending_link(record.oneid, &record.identity, seq), &[]);
            }
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

    /// The event's identities as apply sees them: blocked values set aside (when the identity
    /// policy holds: not for the events of older formats), and each other one with its
    /// binding: read here for those this shard holds (or the router's word, while this shard's
    /// binding epoch is the one it was read at), the router's for the others. An event whose
    /// identities are all blocked and that names no profile is refused `blocked_identity`.
    pub(super) fn sight<'e>(
        &self,
        tx: &Tx<'_>,
        event: &'e Event,
        target: Target,
        found: &[Found],
        policy: bool,
    ) -> Result<Sighting<'e>, EventError> {
        let mut sighting = Sighting {
            live: Vec::with_capacity(event.identities.len()),
            routed: Vec::with_capacity(event.identities.len()),
            not_linked: Vec::new(),
            policy,
        };
        for (i, identity) in event.identities.iter().enumerate() {
            if policy && self.blocks.blocks(identity) {
                sighting
                    .not_linked
                    .push(not_linked(identity, NotLinkedReason::BlockedValue));
                continue;
            }
            let found = found.get(i).copied().unwrap_or(Found::Unbound);
            let binding = if identity.shard(self.n_shards) != self.shard {
                Binding::Elsewhere(found)
            } else {
                Binding::Here(match found {
                    Found::Bound { oneid, epoch } if epoch == self.record.binding_epoch => {
                        debug_assert_eq!(
                            tx.get_as::<OneId>(&keys::identity(identity)),
                            Some(oneid),
                            "the router's binding of {identity:?}"
                        );
                        Some(oneid)
                    }
                    _ => tx.get_as::<OneId>(&keys::identity(identity)),
                })
            };
            sighting.live.push((identity, binding));
            sighting.routed.push(match found {
                Found::Bound { oneid, .. } => Some(oneid),
                Found::Unbound => None,
            });
        }
        if policy && sighting.live.is_empty() && target == Target::Claim {
            return Err(reject_field(
                ErrorCode::BlockedIdentity,
                "identities",
                "every identity of the event is a blocked value, and it names no oneid",
            ));
        }
        Ok(sighting)
    }

    /// The profile the event applies to, with the pair hash of its stored bytes (`None`: a new
    /// profile, minted from the shard's counter), or the outcome that ends the event here: a
    /// duplicate, identities of two profiles, a profile linked elsewhere meanwhile, or none.
    /// Identities of unmergeable kinds pick the profile only for an event that names no
    /// mergeable identity and no oneid.
    pub(super) fn target_profile(
        &mut self,
        tx: &Tx<'_>,
        event: &Event,
        target: Target,
        sighting: &Sighting<'_>,
    ) -> Result<(Profile, Option<u64>), EventOutcome> {
        let (mut bound, unmergeable) = self.bound_here(sighting);
        if let Target::Existing(oneid) = target {
            assert_eq!(oneid.shard(), self.shard, "event routed to the wrong shard");
            bound.insert(oneid);
        }
        if bound.is_empty() && !self.has_mergeable(sighting) {
            bound.extend(unmergeable);
        }
        if bound.len() > 1 {
            // A profile merged meanwhile (its binding or OneID read before the merge): routed
            // again, to its survivor, which holds its exactly-once records.
            if let Some(tombstone) = bound
                .iter()
                .filter(|oneid| oneid.shard() == self.shard)
                .find_map(|oneid| self.tombstone(tx, *oneid))
            {
                return Err(EventOutcome::Moved(tombstone.into));
            }
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
            return Err(EventOutcome::Rejected(conflict(a, b)));
        }
        match first {
            // Linked on another shard after the router resolved it: the retry routes there.
            Some(oneid) if oneid.shard() != self.shard => Err(EventOutcome::Rejected(reject(
                ErrorCode::Unavailable,
                format!("an identity of the event was just linked to {oneid}; retry"),
            ))),
            Some(oneid) => match self.load_profile(tx, oneid) {
                Some((profile, stored_hash)) if profile.merging.is_some() => {
                    self.activations.insert(profile, stored_hash);
                    Err(EventOutcome::Rejected(reject(
                        ErrorCode::Unavailable,
                        format!("profile {oneid} is being merged; retry"),
                    )))
                }
                Some((profile, stored_hash)) => Ok((profile, Some(stored_hash))),
                None => Err(match self.tombstone(tx, oneid) {
                    Some(tombstone) => EventOutcome::Moved(tombstone.into),
                    None => EventOutcome::Rejected(reject_field(
                        ErrorCode::NotFound,
                        "oneid",
                        format!("profile {oneid} does not exist"),
                    )),
                }),
            },
            None => {
                let oneid = OneId::mint(self.shard, self.record.profile_seq + 1);
                Ok((Profile::new(oneid, &self.rules, event.ts), None))
            }
        }
    }

    /// Whether the event names an identity of a mergeable kind (not blocked): then those pick
    /// its profile (a new one if none is bound), never an unmergeable one.
    fn has_mergeable(&self, sighting: &Sighting<'_>) -> bool {
        sighting
            .live
            .iter()
            .any(|(identity, _)| !sighting.policy || self.rules.identity.merges(&identity.kind))
    }

    /// The profiles the event's identities held here are bound to: those of mergeable kinds
    /// (every kind, for older formats), and the first of the others.
    fn bound_here(&self, sighting: &Sighting<'_>) -> (BTreeSet<OneId>, Option<OneId>) {
        let mut mergeable = BTreeSet::new();
        let mut unmergeable = None;
        for (identity, binding) in &sighting.live {
            if let Binding::Here(Some(oneid)) = binding {
                if !sighting.policy || self.rules.identity.merges(&identity.kind) {
                    mergeable.insert(*oneid);
                } else {
                    unmergeable = unmergeable.or(Some(*oneid));
                }
            }
        }
        (mergeable, unmergeable)
    }

    /// What the event's identities give the profile: those held here and unbound are listed
    /// on it (answered: to bind now), those held by other shards and not listed yet are
    /// answered to bind there (follow-ups), within the identity policy's limits (counting the
    /// links still pending) and the shard's limit of follow-ups pending; the others are
    /// answered as not linked, with why. `existed`: the profile was stored before.
    /// `ts`: the event's.
    pub(super) fn take_identities(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        existed: bool,
        ts: Millis,
        sighting: Sighting<'_>,
        link_elsewhere: Vec<Identity>,
    ) -> Result<Taken, EventError> {
        if !sighting.policy {
            return self.take_identities_unjudged(profile, sighting, link_elsewhere);
        }
        let mut taken = Taken {
            not_linked: sighting.not_linked,
            ..Taken::default()
        };
        let (live, link_elsewhere) = if existed {
            let unlinked = |identity: &Identity, bound_to: Option<OneId>| {
                if profile.holds(identity) {
                    return Ok(Unlinked::Free);
                }
                self.unlinked(tx, profile.oneid, identity, ts, bound_to)
            };
            let mut live = Vec::with_capacity(sighting.live.len());
            for ((identity, binding), routed) in sighting.live.into_iter().zip(sighting.routed) {
                if link_elsewhere.contains(identity) {
                    // Judged with those below.
                    live.push((identity, binding));
                    continue;
                }
                let here = match binding {
                    Binding::Here(oneid) => oneid,
                    Binding::Elsewhere(_) => None,
                };
                match unlinked(identity, routed.or(here))? {
                    Unlinked::Free => live.push((identity, binding)),
                    Unlinked::Older(not) => taken.not_linked.push(not),
                }
            }
            let mut elsewhere = Vec::with_capacity(link_elsewhere.len());
            for identity in link_elsewhere {
                match unlinked(&identity, None)? {
                    Unlinked::Free => elsewhere.push(identity),
                    Unlinked::Older(not) => taken.not_linked.push(not),
                }
            }
            (live, elsewhere)
        } else {
            (sighting.live, link_elsewhere)
        };
        let candidates = self.candidates(profile, live, link_elsewhere, &mut taken.not_linked)?;
        // Most events name only identities their profile holds: nothing more to read.
        if !candidates.is_empty() {
            self.admit(tx, profile, existed, candidates, &mut taken);
        }
        NotLinked::sort(&mut taken.not_linked);
        self.check_follow_ups_room(taken.to_link.len())?;
        Ok(taken)
    }

    /// The identities the event could give its profile, each with whether this shard holds it
    /// (bound here now) or another (bound there by a follow-up), in (kind, value) order, which
    /// the limits admit first; an unmergeable one bound to another profile goes to
    /// `not_linked`, and a mergeable one is a conflict (the router resolves those first).
    fn candidates(
        &self,
        profile: &Profile,
        live: Vec<(&Identity, Binding)>,
        link_elsewhere: Vec<Identity>,
        not_linked_out: &mut Vec<NotLinked>,
    ) -> Result<Vec<(Identity, bool)>, EventError> {
        let mut candidates: Vec<(Identity, bool)> = Vec::new();
        for (identity, binding) in live {
            match binding {
                Binding::Here(None) => candidates.push((identity.clone(), true)),
                _ if link_elsewhere.contains(identity) => {}
                Binding::Here(Some(oneid)) | Binding::Elsewhere(Found::Bound { oneid, .. })
                    if oneid != profile.oneid =>
                {
                    if self.rules.identity.merges(&identity.kind) {
                        return Err(conflict(oneid, profile.oneid));
                    }
                    not_linked_out.push(not_linked(identity, NotLinkedReason::MergeDisabled));
                }
                _ => {}
            }
        }
        candidates.extend(
            link_elsewhere
                .into_iter()
                .filter(|identity| !self.blocks.blocks(identity))
                .map(|identity| (identity, false)),
        );
        candidates.retain(|(identity, _)| !profile.holds(identity));
        candidates.sort();
        Ok(candidates)
    }

    /// Takes the candidates the limits admit (counting the links still pending); the others
    /// go to `not_linked`.
    fn admit(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        existed: bool,
        candidates: Vec<(Identity, bool)>,
        taken: &mut Taken,
    ) {
        let pending = if existed {
            self.pending_links(tx, profile.oneid)
        } else {
            BTreeSet::new()
        };
        let mut limits = Limits::new(profile, &pending);
        for (identity, here) in candidates {
            if profile.holds(&identity) || pending.contains(&identity) {
                continue;
            }
            if let Err(reason) = limits.admit(&identity, &self.rules.identity) {
                taken.not_linked.push(not_linked(&identity, reason));
                continue;
            }
            if here {
                profile
                    .identities
                    .entry(identity.kind.clone())
                    .or_default()
                    .insert(identity.value.clone());
                taken.new_bindings.push(identity);
            } else {
                taken.to_link.push(identity);
            }
        }
    }

    /// [`ShardState::take_identities`] as releases before the identity policy did it (for
    /// their events, still in migrated logs): every unbound identity is taken, and an event
    /// that would pass the profile's identity limit is refused whole.
    fn take_identities_unjudged(
        &self,
        profile: &mut Profile,
        sighting: Sighting<'_>,
        link_elsewhere: Vec<Identity>,
    ) -> Result<Taken, EventError> {
        let mut taken = Taken::default();
        for (identity, binding) in sighting.live {
            if binding == Binding::Here(None)
                && profile
                    .identities
                    .entry(identity.kind.clone())
                    .or_default()
                    .insert(identity.value.clone())
            {
                taken.new_bindings.push(identity.clone());
            }
        }
        taken.to_link = link_elsewhere
            .into_iter()
            .filter(|id| !profile.holds(id))
            .collect();
        if profile.identity_count() + taken.to_link.len() > IDENTITIES_PER_PROFILE_MAX {
            return Err(reject_field(
                ErrorCode::IdentityLimit,
                "identities",
                format!("a profile holds at most {IDENTITIES_PER_PROFILE_MAX} identity values"),
            ));
        }
        self.check_follow_ups_room(taken.to_link.len())?;
        Ok(taken)
    }

    /// Refuses (`unavailable`: retry) `more` follow-ups past the shard's limit.
    pub(super) fn check_follow_ups_room(&self, more: usize) -> Result<(), EventError> {
        if self.record.follow_ups_pending + more as u64 > FOLLOW_UPS_PENDING_MAX {
            return Err(reject(
                ErrorCode::Unavailable,
                format!(
                    "shard {} has {FOLLOW_UPS_PENDING_MAX} identity bindings waiting for other shards; retry",
                    self.shard
                ),
            ));
        }
        Ok(())
    }

    /// The identities being bound to the profile on other shards (its follow-ups pending).
    fn pending_links(&self, tx: &Tx<'_>, oneid: OneId) -> BTreeSet<Identity> {
        tx.scan_below(
            &keys::pending_links_prefix(oneid),
            None,
            &[u8::MAX],
            PENDING_LINKS_READ_MAX,
        )
        .iter()
        .map(|(key, _)| keys::pending_link_identity(key))
        .collect()
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
            self.file_follow_up(tx, oneid, identity, false, follow_ups);
        }
    }

    /// Writes the follow-up record that binds `identity` to `oneid` on the identity's shard
    /// (listed under the profile as a pending link), or that unbinds it there.
    pub(super) fn file_follow_up(
        &mut self,
        tx: &mut Tx<'_>,
        oneid: OneId,
        identity: Identity,
        unbind: bool,
        follow_ups: &mut Vec<FollowUp>,
    ) {
        self.record.follow_up_seq += 1;
        self.record.follow_ups_pending += 1;
        let seq = self.record.follow_up_seq;
        let record = FollowUpRecord {
            oneid,
            identity,
            at: self.record.clock,
            unbind,
        };
        tx.put_new(keys::follow_up(seq), &record);
        if !unbind {
            tx.put_new(keys::pending_link(oneid, &record.identity, seq), &());
        }
        follow_ups.push(FollowUp {
            seq,
            oneid,
            identity: record.identity,
            unbind,
        });
    }
}
