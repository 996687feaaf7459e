//! SMART on FHIR scopes, which narrow what a token's role allows (never widen it).
//!
//! A token may do what both its role and its scopes allow. Scopes come from the token's
//! `scope` claim (space-separated, RFC 8693) or `scp` (a list, as Entra ID sends them). Those
//! understood here are resource scopes for Task, Subscription or `*`:
//!
//! - SMART v2: `<context>/<resource>.<permissions>`, the permissions a non-empty subset of
//!   `cruds` in that order (`system/Task.rs`, `user/Subscription.cruds`);
//! - SMART v1: `.read` (= `rs`), `.write` (= `cud`) and `.*` (= `cruds`); the bare `*.*` grants
//!   every permission on every resource, in every context.
//!
//! The context is `system`, `user` or `patient`. `system` and `user` grant the same here (the
//! role rules already say which Tasks a user's token reaches); `patient` grants only with the
//! token's `patient` launch-context claim, and then only Tasks whose `for` is that patient.
//! Scopes with a query (`patient/Task.rs?status=ready`, SMART v2 granular scopes) grant
//! nothing: Baton does not evaluate them, and reading them as the whole would widen them.
//! Other scopes (`openid`, `launch/patient`, `fhirUser`, `offline_access`) are ignored. A token
//! without any resource scope is decided by its role alone (unless its issuer sets
//! `require_scopes`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The resources scopes are checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Task,
    Subscription,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Task => "Task",
            Resource::Subscription => "Subscription",
        }
    }
}

/// One SMART v2 permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    fn bit(self) -> u8 {
        match self {
            Permission::Create => 1,
            Permission::Read => 2,
            Permission::Update => 4,
            Permission::Delete => 8,
            Permission::Search => 16,
        }
    }

    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }
}

const ALL: u8 = 31;
const ORDER: [(char, u8); 5] = [('c', 1), ('r', 2), ('u', 4), ('d', 8), ('s', 16)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    System,
    User,
    Patient,
}

impl Context {
    fn as_str(self) -> &'static str {
        match self {
            Context::System => "system",
            Context::User => "user",
            Context::Patient => "patient",
        }
    }
}

/// One resource scope: a context, a resource (None: `*`) and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Grant {
    /// None: any context (the v1 `*.*`).
    context: Option<Context>,
    resource: Option<Resource>,
    permissions: u8,
}

impl Grant {
    /// A scope string as a grant; None for a scope that is not a resource scope this server
    /// understands (ignored), including those for other resource types.
    fn parse(scope: &str) -> Option<Grant> {
        if scope == "*.*" {
            return Some(Grant {
                context: None,
                resource: None,
                permissions: ALL,
            });
        }
        let (context, rest) = scope.split_once('/')?;
        let context = match context {
            "system" => Context::System,
            "user" => Context::User,
            "patient" => Context::Patient,
            _ => return None,
        };
        let (resource, permissions) = rest.split_once('.')?;
        let resource = match resource {
            "Task" => Some(Resource::Task),
            "Subscription" => Some(Resource::Subscription),
            "*" => None,
            _ => return None,
        };
        // A granular scope's query is not evaluated: the scope grants nothing.
        if permissions.contains('?') {
            return Some(Grant {
                context: Some(context),
                resource,
                permissions: 0,
            });
        }
        let permissions = match permissions {
            "read" => 2 | 16,
            "write" => 1 | 4 | 8,
            "*" => ALL,
            v2 => parse_v2(v2)?,
        };
        Some(Grant {
            context: Some(context),
            resource,
            permissions,
        })
    }
}

/// `cruds` or a subset in that order, each letter once.
fn parse_v2(text: &str) -> Option<u8> {
    let mut bits = 0;
    let mut next = 0;
    for letter in text.chars() {
        let at = ORDER[next..].iter().position(|(c, _)| *c == letter)? + next;
        bits |= ORDER[at].1;
        next = at + 1;
    }
    (bits != 0).then_some(bits)
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(context) = self.context else {
            return f.write_str("*.*");
        };
        let resource = self.resource.map_or("*", Resource::as_str);
        let letters: String = ORDER
            .iter()
            .filter(|(_, bit)| self.permissions & bit != 0)
            .map(|(c, _)| *c)
            .collect();
        // A grant of nothing (a granular scope) keeps a form that reads back as nothing.
        let letters = if letters.is_empty() {
            "none?"
        } else {
            &letters
        };
        write!(f, "{}/{resource}.{letters}", context.as_str())
    }
}

/// The resource scopes of a token. Stored with a subscription's author, so its notifications
/// are held to the scopes it was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<String>", from = "Vec<String>")]
pub struct Scopes {
    grants: Vec<Grant>,
}

impl From<Scopes> for Vec<String> {
    fn from(scopes: Scopes) -> Vec<String> {
        scopes.grants.iter().map(Grant::to_string).collect()
    }
}

impl From<Vec<String>> for Scopes {
    fn from(texts: Vec<String>) -> Scopes {
        Scopes {
            grants: texts
                .iter()
                .map(|t| {
                    Grant::parse(t).unwrap_or(Grant {
                        context: Some(Context::System),
                        resource: None,
                        permissions: 0,
                    })
                })
                .collect(),
        }
    }
}

impl Scopes {
    /// The resource scopes among `scopes`; None when there are none (the role alone decides).
    pub fn parse<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Option<Scopes> {
        let grants: Vec<Grant> = scopes.into_iter().filter_map(Grant::parse).collect();
        (!grants.is_empty()).then_some(Scopes { grants })
    }

    /// Whether these scopes allow `permission` on `resource`: through a `system` or `user`
    /// grant, or through a `patient` grant when the token has a patient context (`patient`).
    pub fn allow(&self, resource: Resource, permission: Permission, patient: bool) -> bool {
        self.grants.iter().any(|g| {
            g.resource.is_none_or(|r| r == resource)
                && g.permissions & permission.bit() != 0
                && (g.context != Some(Context::Patient) || patient)
        })
    }

    /// The context to name in a refusal: that of the token's own scopes (its first), so the
    /// scope named is one its client could ask for; None for a token without any.
    pub fn context(&self) -> Option<&'static str> {
        self.grants
            .iter()
            .find_map(|g| g.context.map(Context::as_str))
    }

    /// Whether the permission comes only through `patient` grants, so the Tasks it reaches are
    /// those of the token's patient.
    pub fn patient_only(&self, resource: Resource, permission: Permission) -> bool {
        !self.grants.iter().any(|g| {
            g.resource.is_none_or(|r| r == resource)
                && g.permissions & permission.bit() != 0
                && g.context != Some(Context::Patient)
        })
    }
}

impl Scopes {
    /// No resource scope at all: what a token of an issuer with `require_scopes` gets when it
    /// carries none, so every request is refused naming the scope it needs.
    pub fn none() -> Scopes {
        Scopes { grants: Vec::new() }
    }
}

/// The scope to name in a refusal: the narrowest that would allow the request.
pub fn needed(context: &str, resource: Resource, permission: Permission) -> String {
    format!("{context}/{}.{}", resource.as_str(), permission.letter())
}

/// What a FHIR API request needs, from its method and its path below the FHIR base: None for
/// requests no resource scope governs (the CapabilityStatement, SubscriptionTopics, and
/// batches and transactions, whose entries are checked one by one).
pub fn for_request(method: &axum::http::Method, path: &str) -> Option<(Resource, Permission)> {
    use axum::http::Method;
    let mut segments = path.trim_matches('/').split('/');
    let resource = match segments.next()? {
        "Task" => Resource::Task,
        "Subscription" => Resource::Subscription,
        _ => return None,
    };
    let rest: Vec<&str> = segments.collect();
    let permission = match (rest.as_slice(), method) {
        ([], &Method::GET) | (["_search"], &Method::POST) | (["_history"], _) => Permission::Search,
        ([op], _) if op.starts_with('$') => Permission::Search,
        // Re-delivering events acts on the subscription: it is a change, not a read.
        ([_, "$resend"], _) => Permission::Update,
        ([], &Method::POST) => Permission::Create,
        ([] | [_], &Method::PUT | &Method::PATCH) => Permission::Update,
        ([] | [_], &Method::DELETE) => Permission::Delete,
        ([_, ..], _) => Permission::Read,
        ([], _) => return None,
    };
    Some((resource, permission))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;
    use Resource::*;

    #[test]
    fn scope_forms_grant_what_smart_says() {
        // (scopes, resource, permission, with a patient context, allowed)
        let cases: &[(&str, Resource, Permission, bool, bool)] = &[
            ("system/Task.cruds", Task, Delete, false, true),
            ("system/Task.rs", Task, Read, false, true),
            ("system/Task.rs", Task, Search, false, true),
            ("system/Task.rs", Task, Create, false, false),
            ("system/Task.rs", Task, Update, false, false),
            ("system/Task.rs", Subscription, Read, false, false),
            ("user/Task.cud", Task, Update, false, true),
            ("user/Task.cud", Task, Read, false, false),
            ("user/Subscription.cruds", Subscription, Create, false, true),
            ("user/Subscription.cruds", Task, Read, false, false),
            ("user/*.rs", Subscription, Search, false, true),
            ("user/*.rs", Task, Create, false, false),
            ("user/Task.read", Task, Search, false, true),
            ("user/Task.read", Task, Update, false, false),
            ("user/Task.write", Task, Delete, false, true),
            ("user/Task.write", Task, Read, false, false),
            ("user/Task.*", Task, Delete, false, true),
            ("*.*", Subscription, Delete, false, true),
            ("patient/Task.rs", Task, Read, true, true),
            ("patient/Task.rs", Task, Read, false, false),
            ("patient/Task.rs?status=ready", Task, Read, true, false),
            // Out of order or repeated letters are not a v2 scope: ignored.
            ("user/Task.sr system/Task.c", Task, Read, false, false),
            ("user/Task.rr system/Task.c", Task, Create, false, true),
            (
                "user/Task.rs openid fhirUser launch/patient",
                Task,
                Read,
                false,
                true,
            ),
            (
                "user/Observation.rs system/Task.c",
                Task,
                Read,
                false,
                false,
            ),
        ];
        for (scopes, resource, permission, patient, allowed) in cases {
            let parsed = Scopes::parse(scopes.split(' ')).expect(scopes);
            assert_eq!(
                parsed.allow(*resource, *permission, *patient),
                *allowed,
                "{scopes} {resource:?} {permission:?}"
            );
            // Stored and read back, the scopes grant the same.
            let round: Scopes =
                serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
            assert_eq!(
                round.allow(*resource, *permission, *patient),
                *allowed,
                "stored {scopes}"
            );
        }
        assert_eq!(Scopes::parse("openid fhirUser".split(' ')), None);
        assert_eq!(Scopes::parse("user/Observation.rs".split(' ')), None);
        assert!(!Scopes::none().allow(Task, Read, true));
        let patient = Scopes::parse(["patient/Task.rs", "user/Subscription.c"]).unwrap();
        assert!(patient.patient_only(Task, Read));
        assert!(!patient.patient_only(Subscription, Create));
    }

    #[test]
    fn requests_need_the_permission_of_their_interaction() {
        use axum::http::Method;
        let cases = [
            (Method::GET, "/Task", Some((Task, Search))),
            (Method::POST, "/Task/_search", Some((Task, Search))),
            (Method::GET, "/Task/_history", Some((Task, Search))),
            (Method::POST, "/Task", Some((Task, Create))),
            (Method::GET, "/Task/1", Some((Task, Read))),
            (Method::GET, "/Task/1/_history/2", Some((Task, Read))),
            (Method::PUT, "/Task/1", Some((Task, Update))),
            (Method::PATCH, "/Task/1", Some((Task, Update))),
            (Method::PUT, "/Task", Some((Task, Update))),
            (Method::DELETE, "/Task/1", Some((Task, Delete))),
            (Method::DELETE, "/Task", Some((Task, Delete))),
            (Method::GET, "/Subscription", Some((Subscription, Search))),
            (Method::POST, "/Subscription", Some((Subscription, Create))),
            (
                Method::GET,
                "/Subscription/$status",
                Some((Subscription, Search)),
            ),
            (Method::GET, "/Subscription/s1", Some((Subscription, Read))),
            (
                Method::GET,
                "/Subscription/s1/$status",
                Some((Subscription, Read)),
            ),
            (
                Method::POST,
                "/Subscription/s1/$get-ws-binding-token",
                Some((Subscription, Read)),
            ),
            (
                Method::GET,
                "/Subscription/s1/$events",
                Some((Subscription, Read)),
            ),
            (
                Method::DELETE,
                "/Subscription/s1",
                Some((Subscription, Delete)),
            ),
            (Method::GET, "/metadata", None),
            (Method::GET, "/SubscriptionTopic", None),
            (Method::POST, "/", None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(for_request(&method, path), expected, "{method} {path}");
        }
    }
}
