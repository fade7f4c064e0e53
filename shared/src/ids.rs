//! Identities at boundaries: an agent's, a relay's, a job's and a deployment's id are distinct
//! types, so that one is never passed where another is meant. Each reads as its text (`Deref`
//! to `str`, `Borrow<str>` for map lookups) and is its plain string on the wire and in JSON.

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            Default,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            serde::Serialize,
            serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type!(
    /// An enrolled agent's id (`a-…`).
    AgentId
);
id_type!(
    /// An enrolled relay's id (`r-…`).
    RelayId
);
id_type!(
    /// A job's id: one agent's share of a deployment.
    JobId
);
id_type!(
    /// A deployment's id.
    DeploymentId
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn an_id_is_its_text_on_the_wire_and_in_lookups() {
        let id = AgentId::new("a-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"a-1\"");
        let back: AgentId = serde_json::from_str("\"a-1\"").unwrap();
        assert_eq!(back, id);
        let mut map = HashMap::new();
        map.insert(id.clone(), 1);
        assert_eq!(map.get("a-1"), Some(&1));
        assert_eq!(id, "a-1");
        assert_eq!(id.len(), 3, "reads as str");
        assert_eq!(format!("{id}"), "a-1");
    }
}
