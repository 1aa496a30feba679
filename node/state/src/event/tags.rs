//! Manual tags and attributes.

use super::Applying;
use crate::keys::{self, DueKind};
use crate::profile::{Profile, ATTRIBUTES_PER_PROFILE_MAX, MANUAL_TAGS_PER_PROFILE_MAX};
use crate::tx::{reject_field, EventWrites};
use oneid_protocol::event::EventError;
use oneid_protocol::num::Millis;
use oneid_protocol::predicate::Value;
use oneid_protocol::ErrorCode;

impl Applying<'_, '_> {
    /// A manual tag, with its expiry in the due-time index (at most
    /// [`MANUAL_TAGS_PER_PROFILE_MAX`] per profile).
    pub(super) fn tag_add(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        tag: &str,
        expires_at: &Option<Millis>,
    ) -> Result<(), EventError> {
        let (tx, now) = (self.tx, self.now);
        if let Some(at) = expires_at {
            if *at <= now {
                return Err(reject_field(
                    ErrorCode::AlreadyExpired,
                    "expires_at",
                    format!("expires_at {at} is not after the shard's clock {now}"),
                ));
            }
        }
        if !profile.manual_tags.contains_key(tag)
            && profile.manual_tags.len() >= MANUAL_TAGS_PER_PROFILE_MAX
        {
            return Err(reject_field(
                ErrorCode::TagLimit,
                "tag",
                format!("a profile holds at most {MANUAL_TAGS_PER_PROFILE_MAX} manual tags"),
            ));
        }
        profile.manual_tags.insert(tag.to_string(), *expires_at);
        profile.manual_tag_at.insert(tag.to_string(), self.event.ts);
        if let Some(at) = expires_at {
            writes.put_due(
                tx,
                keys::due(*at, profile.oneid, DueKind::TagExpiry, tag.as_bytes()),
            );
        }

        Ok(())
    }

    /// Attributes set or removed (at most [`ATTRIBUTES_PER_PROFILE_MAX`] per profile).
    pub(super) fn update_attributes(
        &self,
        profile: &mut Profile,
        attributes: &[(String, Option<Value>)],
    ) -> Result<(), EventError> {
        for (name, value) in attributes {
            match value {
                Some(value) => {
                    profile.attributes.insert(name.clone(), value.clone());
                    profile.attribute_at.insert(name.clone(), self.event.ts);
                }
                None => profile.remove_attribute(name, self.event.ts),
            };
        }
        if profile.attributes.len() > ATTRIBUTES_PER_PROFILE_MAX {
            return Err(reject_field(
                ErrorCode::AttributeLimit,
                "attributes",
                format!("a profile holds at most {ATTRIBUTES_PER_PROFILE_MAX} attributes"),
            ));
        }

        Ok(())
    }
}
