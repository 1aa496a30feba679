//! Enums that a newer server may extend: error codes, event statuses, reasons.
//!
//! [`open_enum!`] declares such an enum with its known values and an `Other(String)` for any
//! value this release does not know, so that a client built today keeps working against a
//! newer server. On JSON (and any human-readable format) a value is its snake_case name. On
//! postcard (stored results, peer messages) it keeps the encoding `#[derive(Serialize,
//! Deserialize)]` gives a fieldless enum: the index of the value in declaration order; `Other`
//! takes the index [`OTHER_INDEX`], never one a later value will have, so a value a newer
//! release added is an error here, as it was for the derived enum, rather than misread.

/// Declares `pub enum $name { $variant..., Other(String) }` with `ALL` (the known values in
/// order), `as_str`, `Display`, serde as described above, and a JSON schema listing the
/// known names.
#[macro_export]
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident = $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant, )*
            /// A value this release does not know (from a newer server): its name.
            Other(String),
        }

        impl $name {
            /// Every known value, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            const NAMES: &'static [&'static str] = &[$($text),*];

            /// The value's name on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $name::Other(name) => name,
                    known => {
                        let i = $name::ALL.iter().position(|v| v == known).expect("listed");
                        $name::NAMES[i]
                    }
                }
            }

            /// The value named `name`; `Other` if this release does not know it.
            pub fn from_name(name: &str) -> $name {
                match $name::NAMES.iter().position(|n| *n == name) {
                    Some(i) => $name::ALL[i].clone(),
                    None => $name::Other(name.to_string()),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    return serializer.serialize_str(self.as_str());
                }
                match self {
                    $name::Other(name) => serializer.serialize_newtype_variant(
                        stringify!($name),
                        $crate::open_enum::OTHER_INDEX,
                        "other",
                        name,
                    ),
                    value => {
                        let i = $name::ALL.iter().position(|v| v == value).expect("listed");
                        serializer.serialize_unit_variant(stringify!($name), i as u32, $name::NAMES[i])
                    }
                }
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                if deserializer.is_human_readable() {
                    let name = <::std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                    return Ok($name::from_name(&name));
                }
                deserializer.deserialize_enum(
                    stringify!($name),
                    $name::NAMES,
                    $crate::open_enum::ByIndex { all: $name::ALL, other: $name::Other },
                )
            }
        }

        impl ::schemars::JsonSchema for $name {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut ::schemars::SchemaGenerator) -> ::schemars::Schema {
                ::schemars::json_schema!({ "type": "string", "enum": $name::NAMES })
            }
        }
    };
}

/// The binary index of `Other`: the largest, which no declared value reaches.
pub const OTHER_INDEX: u32 = u32::MAX;

/// Reads an open enum from a binary format: the index of a known value, or `Other` (at
/// [`OTHER_INDEX`]) with its name.
#[doc(hidden)]
pub struct ByIndex<T: 'static> {
    pub all: &'static [T],
    pub other: fn(String) -> T,
}

impl<'de, T: Clone + 'static> serde::de::Visitor<'de> for ByIndex<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the index of a known value, or another value's name")
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<T, A::Error> {
        use serde::de::{Error, VariantAccess};
        let (index, variant): (u32, _) = data.variant()?;
        if index == OTHER_INDEX {
            return Ok((self.other)(variant.newtype_variant()?));
        }
        match self.all.get(index as usize) {
            Some(known) => {
                variant.unit_variant()?;
                Ok(known.clone())
            }
            None => Err(A::Error::custom(format!("no value has index {index}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::api::{ErrorCode, EventStatus};

    #[test]
    fn json_names_unknown_values_and_postcard_keeps_the_derived_encoding() {
        assert_eq!(
            serde_json::to_string(&ErrorCode::UnknownOrder).unwrap(),
            r#""unknown_order""#
        );
        assert_eq!(
            serde_json::from_str::<ErrorCode>(r#""from_a_newer_release""#).unwrap(),
            ErrorCode::Other("from_a_newer_release".into())
        );
        assert_eq!(
            serde_json::from_str::<EventStatus>(r#""merged""#).unwrap(),
            EventStatus::Other("merged".into())
        );
        // What `#[derive(Serialize)]` wrote for these codes before they were open: the index.
        #[derive(serde::Serialize)]
        enum Derived {
            _A,
            _B,
            Third,
        }
        assert_eq!(
            postcard::to_allocvec(&Derived::Third).unwrap(),
            postcard::to_allocvec(&ErrorCode::ALL[2]).unwrap()
        );
        // A value a newer release added (the next index) is refused, as the derived enum did.
        let next = postcard::to_allocvec(&(ErrorCode::ALL.len() as u32)).unwrap();
        assert!(postcard::from_bytes::<ErrorCode>(&next).is_err());
        for code in ErrorCode::ALL
            .iter()
            .cloned()
            .chain([ErrorCode::Other("x".into())])
        {
            let bytes = postcard::to_allocvec(&code).unwrap();
            assert_eq!(postcard::from_bytes::<ErrorCode>(&bytes).unwrap(), code);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }
}
